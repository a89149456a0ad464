// Checkpoint folders: a single model.safetensors or shards listed by model.safetensors.index.json,
// tensors looked up with their expected shapes, and every inconsistency refused with a message
// naming the file and the tensor.
#include <gtest/gtest.h>

#include "io/safetensors.h"
#include "safetensors_test_writer.h"

namespace adakv {
namespace {

using testing::le_bytes;
using testing::safetensors_image;
using testing::TempDir;
using testing::TestTensor;
using testing::write_file;

TestTensor f32_tensor(const std::string& name, std::vector<int64_t> shape, float first) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  std::vector<float> v(static_cast<size_t>(n));
  for (size_t i = 0; i < v.size(); ++i) v[i] = first + static_cast<float>(i);
  return {name, "F32", std::move(shape), le_bytes(v)};
}

float first_value(const TensorInfo* t) {
  float v = 0;
  std::memcpy(&v, t->data, 4);
  return v;
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// Two shards as transformers writes them, with the index mapping each tensor to its shard.
void write_sharded(const TempDir& dir, const std::string& weight_map_extra = "") {
  write_file(dir.path() / "model-00001-of-00002.safetensors",
             safetensors_image({f32_tensor("model.embed_tokens.weight", {4, 2}, 100.0f),
                                f32_tensor("model.layers.0.input_layernorm.weight", {2}, 200.0f)}));
  write_file(dir.path() / "model-00002-of-00002.safetensors",
             safetensors_image({f32_tensor("model.norm.weight", {2}, 300.0f), f32_tensor("lm_head.weight", {4, 2}, 400.0f)}));
  write_file(dir.path() / "model.safetensors.index.json",
             std::string(R"({"metadata": {"total_size": 96}, "weight_map": {)") +
                 R"("lm_head.weight": "model-00002-of-00002.safetensors",)"
                 R"("model.embed_tokens.weight": "model-00001-of-00002.safetensors",)"
                 R"("model.layers.0.input_layernorm.weight": "model-00001-of-00002.safetensors",)" +
                 weight_map_extra + R"("model.norm.weight": "model-00002-of-00002.safetensors"}})");
}

TEST(Checkpoint, SingleFile) {
  TempDir dir;
  write_file(dir.path() / "model.safetensors",
             safetensors_image({f32_tensor("a", {2, 3}, 1.0f), f32_tensor("b", {3}, 10.0f)}));
  auto ckpt = Checkpoint::open(dir.path().string());
  ASSERT_TRUE(ckpt) << ckpt.status().message();
  EXPECT_EQ(ckpt->names(), (std::vector<std::string>{"a", "b"}));
  auto a = ckpt->get("a", {2, 3});
  ASSERT_TRUE(a) << a.status().message();
  EXPECT_EQ(first_value(*a), 1.0f);
  float a5 = 0;
  std::memcpy(&a5, (*a)->data + 20, 4);
  EXPECT_EQ(a5, 6.0f);
  EXPECT_EQ(first_value(ckpt->find("b")), 10.0f);
  EXPECT_EQ(ckpt->find("c"), nullptr);
  EXPECT_EQ(ckpt->file_of("b"), dir.file("model.safetensors"));
  EXPECT_EQ(ckpt->file_of("c"), "");
  EXPECT_EQ(ckpt->dir(), dir.path().string());
}

TEST(Checkpoint, ShardedReadsEachTensorFromItsShard) {
  TempDir dir;
  write_sharded(dir);
  auto ckpt = Checkpoint::open(dir.path().string());
  ASSERT_TRUE(ckpt) << ckpt.status().message();
  EXPECT_EQ(ckpt->names(), (std::vector<std::string>{"lm_head.weight", "model.embed_tokens.weight",
                                                      "model.layers.0.input_layernorm.weight", "model.norm.weight"}));
  auto embed = ckpt->get("model.embed_tokens.weight", {4, 2});
  ASSERT_TRUE(embed);
  EXPECT_EQ(first_value(*embed), 100.0f);
  auto head = ckpt->get("lm_head.weight", {4, 2});
  ASSERT_TRUE(head);
  EXPECT_EQ(first_value(*head), 400.0f);
  float last = 0;
  std::memcpy(&last, (*head)->data + 28, 4);
  EXPECT_EQ(last, 407.0f);
  EXPECT_EQ(first_value(ckpt->find("model.norm.weight")), 300.0f);
  EXPECT_TRUE(contains(ckpt->file_of("model.norm.weight"), "model-00002-of-00002.safetensors"));
  EXPECT_TRUE(contains(ckpt->file_of("model.embed_tokens.weight"), "model-00001-of-00002.safetensors"));
}

TEST(Checkpoint, SingleFileWinsOverIndexAsInTransformers) {
  TempDir dir;
  write_sharded(dir);
  write_file(dir.path() / "model.safetensors", safetensors_image({f32_tensor("only", {1}, 5.0f)}));
  auto ckpt = Checkpoint::open(dir.path().string());
  ASSERT_TRUE(ckpt) << ckpt.status().message();
  EXPECT_EQ(ckpt->names(), (std::vector<std::string>{"only"}));
}

TEST(CheckpointErrors, WrongShapeNamesTensorFileAndBothShapes) {
  TempDir dir;
  write_sharded(dir);
  auto ckpt = Checkpoint::open(dir.path().string());
  ASSERT_TRUE(ckpt);
  auto bad = ckpt->get("lm_head.weight", {2, 4});
  ASSERT_FALSE(bad);
  const std::string& m = bad.status().message();
  EXPECT_TRUE(contains(m, "model-00002-of-00002.safetensors")) << m;
  EXPECT_TRUE(contains(m, "tensor 'lm_head.weight' has shape [4, 2] but the model expects [2, 4]")) << m;
}

TEST(CheckpointErrors, MissingTensorNamesTensorAndSource) {
  TempDir dir;
  write_file(dir.path() / "model.safetensors", safetensors_image({f32_tensor("a", {1}, 0.0f)}));
  auto ckpt = Checkpoint::open(dir.path().string());
  ASSERT_TRUE(ckpt);
  auto missing = ckpt->get("model.layers.0.self_attn.q_proj.weight", {1});
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_TRUE(contains(missing.status().message(), "model.safetensors")) << missing.status().message();
  EXPECT_TRUE(contains(missing.status().message(), "tensor 'model.layers.0.self_attn.q_proj.weight' not found"));
}

TEST(CheckpointErrors, NoWeightsAtAll) {
  TempDir dir;
  auto ckpt = Checkpoint::open(dir.path().string());
  ASSERT_FALSE(ckpt);
  EXPECT_EQ(ckpt.status().code(), StatusCode::kNotFound);
  EXPECT_EQ(ckpt.status().message(), dir.path().string() + ": no model.safetensors or model.safetensors.index.json");

  auto gone = Checkpoint::open(dir.file("does-not-exist"));
  ASSERT_FALSE(gone);
  EXPECT_EQ(gone.status().code(), StatusCode::kNotFound);
  EXPECT_TRUE(contains(gone.status().message(), "does-not-exist: model directory does not exist"));
}

TEST(CheckpointErrors, MissingShard) {
  TempDir dir;
  write_sharded(dir);
  std::filesystem::remove(dir.path() / "model-00002-of-00002.safetensors");
  auto ckpt = Checkpoint::open(dir.path().string());
  ASSERT_FALSE(ckpt);
  EXPECT_EQ(ckpt.status().code(), StatusCode::kNotFound);
  EXPECT_TRUE(contains(ckpt.status().message(),
                       "model-00002-of-00002.safetensors: shard listed in model.safetensors.index.json is missing"))
      << ckpt.status().message();
}

TEST(CheckpointErrors, IndexNamesTensorItsShardLacks) {
  TempDir dir;
  write_sharded(dir, R"("model.layers.0.mlp.up_proj.weight": "model-00001-of-00002.safetensors",)");
  auto ckpt = Checkpoint::open(dir.path().string());
  ASSERT_FALSE(ckpt);
  EXPECT_EQ(ckpt.status().code(), StatusCode::kDataLoss);
  EXPECT_TRUE(contains(ckpt.status().message(),
                       "model-00001-of-00002.safetensors: tensor 'model.layers.0.mlp.up_proj.weight' listed in "
                       "model.safetensors.index.json is missing from this shard"))
      << ckpt.status().message();
}

TEST(CheckpointErrors, TensorDefinedInTwoShards) {
  TempDir dir;
  write_sharded(dir);
  // Shard 2 also carries the embedding (e.g. a bad merge of two exports).
  write_file(dir.path() / "model-00002-of-00002.safetensors",
             safetensors_image({f32_tensor("model.norm.weight", {2}, 300.0f), f32_tensor("lm_head.weight", {4, 2}, 400.0f),
                                f32_tensor("model.embed_tokens.weight", {4, 2}, 900.0f)}));
  auto ckpt = Checkpoint::open(dir.path().string());
  ASSERT_FALSE(ckpt);
  const std::string& m = ckpt.status().message();
  EXPECT_TRUE(contains(m, "tensor 'model.embed_tokens.weight' is defined in both")) << m;
  EXPECT_TRUE(contains(m, "model-00001-of-00002.safetensors and ")) << m;
  EXPECT_TRUE(contains(m, "model-00002-of-00002.safetensors")) << m;
}

TEST(CheckpointErrors, CorruptShardNamesTheShard) {
  TempDir dir;
  write_sharded(dir);
  write_file(dir.path() / "model-00001-of-00002.safetensors", std::vector<uint8_t>{1, 2, 3});
  auto ckpt = Checkpoint::open(dir.path().string());
  ASSERT_FALSE(ckpt);
  EXPECT_TRUE(contains(ckpt.status().message(), "model-00001-of-00002.safetensors: file is 3 bytes"))
      << ckpt.status().message();
}

TEST(CheckpointErrors, BadIndexFiles) {
  struct Case {
    std::string index;
    std::string phrase;
  };
  const std::vector<Case> cases = {
      {R"({"weight_map": {"a": "x.safetensors",})", "model.safetensors.index.json: malformed JSON: "},
      {R"({"metadata": {}})", "model.safetensors.index.json: no \"weight_map\" object"},
      {R"([1])", "no \"weight_map\" object"},
      {R"({"weight_map": []})", "no \"weight_map\" object"},
      {R"({"weight_map": {}})", "weight_map is empty"},
      {R"({"weight_map": {"a": 3}})", "weight_map entry 'a' is a number, not a file name"},
      {R"({"weight_map": {"a": "../secret.safetensors"}})", "shard name '../secret.safetensors' (tensor 'a') points outside"},
      {R"({"weight_map": {"a": "/etc/passwd"}})", "points outside the model directory"},
      {R"({"weight_map": {"a": "x\ny.safetensors"}})", "shard name 'x\\x0ay.safetensors' (tensor 'a')"},
  };
  for (const Case& c : cases) {
    TempDir dir;
    write_file(dir.path() / "model.safetensors.index.json", c.index);
    auto ckpt = Checkpoint::open(dir.path().string());
    ASSERT_FALSE(ckpt) << c.index;
    EXPECT_EQ(ckpt.status().code(), StatusCode::kDataLoss) << c.index;
    EXPECT_TRUE(contains(ckpt.status().message(), c.phrase)) << ckpt.status().message();
    EXPECT_TRUE(contains(ckpt.status().message(), "model.safetensors.index.json")) << ckpt.status().message();
    EXPECT_FALSE(contains(ckpt.status().message(), "\n")) << ckpt.status().message();
  }
}

TEST(Checkpoint, PointersSurviveMovingTheCheckpoint) {
  TempDir dir;
  write_sharded(dir);
  auto opened = Checkpoint::open(dir.path().string());
  ASSERT_TRUE(opened);
  const TensorInfo* before = opened->find("model.norm.weight");
  Checkpoint moved = std::move(*opened);
  EXPECT_EQ(moved.find("model.norm.weight"), before);
  EXPECT_EQ(first_value(before), 300.0f);
}

}  // namespace
}  // namespace adakv
