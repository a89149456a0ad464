// The runner factory (src/engine/model_runner_factory.h): device names, the device options'
// checks, and a clear error when the device asked for cannot be used. Needs no GPU and no model.
#include <gtest/gtest.h>

#include <string>

#include "adakv/engine.h"
#include "engine/model_runner_factory.h"

#if ADAKV_HAVE_CUDA
#include "backends/cuda/cuda_model.h"
#endif

namespace adakv {
namespace {

bool device_usable() {
#if ADAKV_HAVE_CUDA
  return cuda::cuda_device_available().is_ok();
#else
  return false;
#endif
}

TEST(ModelRunnerFactory, ResolvesDeviceNames) {
  EXPECT_EQ(resolve_device("cpu").value(), "cpu");
  EXPECT_EQ(resolve_device("auto").value(), device_usable() ? "cuda" : "cpu");
  auto bad = resolve_device("tpu");
  ASSERT_FALSE(bad.has_value());
  EXPECT_NE(bad.status().message().find("cpu | cuda | auto"), std::string::npos) << bad.status().message();
#if ADAKV_HAVE_CUDA
  EXPECT_EQ(resolve_device("cuda").value(), "cuda");
#else
  auto no = resolve_device("cuda");
  ASSERT_FALSE(no.has_value());
  EXPECT_NE(no.status().message().find("adakv was built without CUDA"), std::string::npos) << no.status().message();
#endif
}

// The label `adakv serve` prints at start-up.
TEST(ModelRunnerFactory, LabelsTheDevice) {
  EXPECT_EQ(device_label("cpu"), "cpu");
  EXPECT_NE(device_label("tpu").find("cpu | cuda | auto"), std::string::npos) << device_label("tpu");
  const std::string automatic = device_label("auto");
  if (device_usable()) {
    EXPECT_EQ(automatic.rfind("cuda (", 0), 0u) << automatic;
    EXPECT_EQ(automatic.back(), ')') << automatic;
    EXPECT_EQ(automatic.find("no device"), std::string::npos) << automatic;
  } else {
    EXPECT_EQ(automatic, "cpu");
  }
}

TEST(ModelRunnerFactory, ChecksDeviceOptions) {
  EngineOptions o;
  o.model_dir = "/nonexistent";
  EXPECT_TRUE(validate_device_options(o).is_ok());
  o.gpu_memory_fraction = 0.0;
  EXPECT_FALSE(validate_device_options(o).is_ok());
  o.gpu_memory_fraction = 0.9;
  o.random_weights = "config.json";
  const Status s = validate_device_options(o);  // device cpu
  ASSERT_FALSE(s.is_ok());
  EXPECT_NE(s.message().find("need device cuda"), std::string::npos) << s.message();
  o.device = "tpu";
  EXPECT_FALSE(validate_engine_options(o).is_ok());
}

TEST(ModelRunnerFactory, CudaWithoutAUsableDeviceIsAClearError) {
  if (device_usable()) GTEST_SKIP() << "a CUDA device is present";
  EngineOptions o;
  o.model_dir = "/nonexistent";
  o.device = "cuda";
  auto e = Engine::create(o);
  ASSERT_FALSE(e.has_value());
  const std::string m = e.status().message();
  EXPECT_TRUE(m.find("CUDA") != std::string::npos) << m;
}

}  // namespace
}  // namespace adakv
