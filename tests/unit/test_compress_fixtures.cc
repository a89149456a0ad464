// The C++ compression pipeline against the independent numpy reference
// (tools/reference/compress_ref.py): for every fixture case in tests/fixtures/compress/, the
// scores agree to fp32 rounding and the keep sets, budgets and Ada counts agree exactly. The
// selection is also run on the reference's own fp32 scores, which isolates allocation and
// selection from any floating-point difference in the scorers.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>
#include <string>
#include <vector>

#include "compress/kvcompress.h"
#include "compress/policy.h"

namespace adakv {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

const fs::path kDir = fs::path(ADAKV_FIXTURES_DIR) / "compress";

std::vector<float> read_f32(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  EXPECT_TRUE(f.good()) << p;
  f.seekg(0, std::ios::end);
  const auto bytes = static_cast<size_t>(f.tellg());
  f.seekg(0);
  std::vector<float> v(bytes / sizeof(float));
  f.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(v.size() * sizeof(float)));
  return v;
}

std::string keep_mask(const std::vector<int32_t>& keep, int32_t L) {
  std::vector<int> nib(static_cast<size_t>((L + 3) / 4), 0);
  for (int32_t j : keep) nib[static_cast<size_t>(j / 4)] |= 1 << (j % 4);
  std::string s;
  for (int x : nib) s += "0123456789abcdef"[x];
  return s;
}

CompressConfig config_from_json(const json& j) {
  CompressConfig c;
  c.policy = *parse_kv_policy(j.at("policy").get<std::string>());
  c.budget = j.value("budget", 0);
  c.window = j.value("window", 32);
  c.pool = *parse_pool_kind(j.value("pool", std::string("max")));
  c.pool_kernel = j.value("pool_kernel", 7);
  c.alpha = j.value("alpha", 0.2);
  c.beta = j.value("beta", 20);
  c.gqa = *parse_gqa_reduce(j.value("gqa", std::string("mean")));
  c.sink = j.value("sink", 4);
  c.max_cache_tokens = j.value("max_cache_tokens", int64_t{0});
  c.protected_window = j.value("protected_window", 32);
  c.pyramid_reference_rounding = j.value("pyramid_reference_rounding", false);
  c.seed = j.value("seed", uint64_t{0});
  return c;
}

// Reference scores of one layer: [Hkv][n] rows of the expected blob.
HeadScores blob_rows(const std::vector<float>& blob, const json& ref) {
  const auto shape = ref.at("shape").get<std::vector<int64_t>>();
  const int64_t off = ref.at("offset").get<int64_t>();
  HeadScores rows(static_cast<size_t>(shape[0]));
  for (int64_t h = 0; h < shape[0]; ++h)
    rows[static_cast<size_t>(h)].assign(blob.begin() + off + h * shape[1], blob.begin() + off + (h + 1) * shape[1]);
  return rows;
}

// Scores agree to fp32 rounding: both sides round a float64 result once.
void expect_scores_close(const HeadScores& got, const HeadScores& want, const std::string& what, int* exact, int* total) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t h = 0; h < got.size(); ++h) {
    ASSERT_EQ(got[h].size(), want[h].size()) << what;
    for (size_t j = 0; j < got[h].size(); ++j) {
      const float a = got[h][j], b = want[h][j];
      EXPECT_LE(std::fabs(a - b), 4e-7f * std::fabs(b) + 1e-30f) << what << " head " << h << " entry " << j;
      *exact += a == b;
      ++*total;
    }
  }
}

struct Inputs {
  int32_t N, L, H, hkv, d, hidden;
  std::vector<float> data;
  int64_t q_off, k_off, v_off, o_off;
  LayerTensors layer(int32_t l) const {
    LayerTensors t;
    t.num_heads = H;
    t.num_kv_heads = hkv;
    t.head_dim = d;
    t.queries = data.data() + q_off + static_cast<int64_t>(l) * L * H * d;
    t.num_queries = L;  // all prompt queries: window policies use the last w, H2O all
    for (int32_t h = 0; h < hkv; ++h) {
      t.lengths.push_back(L);
      t.keys.push_back(data.data() + k_off + (static_cast<int64_t>(l) * L * hkv + h) * d);
      t.values.push_back(data.data() + v_off + (static_cast<int64_t>(l) * L * hkv + h) * d);
    }
    t.kv_stride = static_cast<int64_t>(hkv) * d;
    t.o_proj = data.data() + o_off + static_cast<int64_t>(l) * hidden * H * d;
    t.hidden_size = hidden;
    return t;
  }
};

TEST(CompressFixtures, KeepSetsEqualTheNumpyReference) {
  ASSERT_TRUE(fs::is_directory(kDir)) << kDir << " missing: run tools/reference/gen_compress_fixtures.py";
  int cases = 0, exact = 0, total = 0;
  for (const auto& entry : fs::directory_iterator(kDir)) {
    if (entry.path().extension() != ".json") continue;
    std::ifstream f(entry.path());
    const json fx = json::parse(f);
    ASSERT_EQ(fx.at("format"), "adakv-compress-fixture-1");
    const json& sh = fx.at("shape");
    Inputs in{sh.at("num_layers"), sh.at("length"), sh.at("num_heads"), sh.at("num_kv_heads"), sh.at("head_dim"),
              sh.at("hidden_size"), read_f32(kDir / fx.at("inputs").at("file").get<std::string>()), 0, 0, 0, 0};
    const json& arr = fx.at("inputs").at("arrays");
    in.q_off = arr.at("queries").at("offset");
    in.k_off = arr.at("keys").at("offset");
    in.v_off = arr.at("values").at("offset");
    in.o_off = arr.at("o_proj").at("offset");
    const std::vector<float> expected = read_f32(kDir / fx.at("expected_file").get<std::string>());
    const std::string set = entry.path().stem().string();

    for (const json& cs : fx.at("cases")) {
      const std::string name = set + "/" + cs.at("name").get<std::string>();
      SCOPED_TRACE(name);
      const CompressConfig c = config_from_json(cs.at("config"));
      ASSERT_TRUE(validate_compress_config(c).is_ok()) << validate_compress_config(c).message();
      const json& layers = cs.at("layers");
      ASSERT_EQ(static_cast<int32_t>(layers.size()), in.N);
      ++cases;

      if (c.policy == KvPolicy::kFull) {
        std::vector<int32_t> all(static_cast<size_t>(in.L));
        std::iota(all.begin(), all.end(), 0);
        for (const json& lj : layers)
          for (int32_t h = 0; h < in.hkv; ++h) EXPECT_EQ(lj.at("keep_mask")[static_cast<size_t>(h)], keep_mask(all, in.L));
        continue;
      }
      if (c.policy == KvPolicy::kStreamingLlm) {
        for (int32_t l = 0; l < in.N; ++l) {
          const LayerPlan plan = plan_streaming(c, l, std::vector<int32_t>(static_cast<size_t>(in.hkv), in.L));
          for (int32_t h = 0; h < in.hkv; ++h)
            EXPECT_EQ(keep_mask(plan.keep[static_cast<size_t>(h)], in.L), layers[static_cast<size_t>(l)].at("keep_mask")[static_cast<size_t>(h)]);
        }
        continue;
      }
      if (c.policy == KvPolicy::kKvCompress) {
        const int32_t block = cs.at("config").at("block_size");
        const int64_t T = c.max_cache_tokens > 0 ? c.max_cache_tokens : c.budget;
        std::vector<int32_t> pos(static_cast<size_t>(in.L));
        std::iota(pos.begin(), pos.end(), 0);
        HeadScores ours, theirs;
        for (int32_t l = 0; l < in.N; ++l) {
          auto s = compute_layer_scores(c, l, in.layer(l));
          ASSERT_TRUE(s.has_value()) << s.status().message();
          const HeadScores ref = blob_rows(expected, layers[static_cast<size_t>(l)].at("metric"));
          expect_scores_close(s->metric, ref, name + " metric", &exact, &total);
          for (auto& r : s->metric) ours.push_back(r);
          for (auto& r : ref) theirs.push_back(r);
        }
        for (const HeadScores* m : {&ours, &theirs}) {
          std::vector<KvCompressRow> rows;
          for (const auto& r : *m) rows.push_back({r, pos});
          const auto evict = kvcompress_select(rows, static_cast<int64_t>(in.N) * in.hkv * T, block, in.L, c.protected_window);
          for (int32_t l = 0; l < in.N; ++l)
            for (int32_t h = 0; h < in.hkv; ++h) {
              std::vector<uint8_t> gone(static_cast<size_t>(in.L), 0);
              for (int32_t e : evict[static_cast<size_t>(l * in.hkv + h)]) gone[static_cast<size_t>(e)] = 1;
              std::vector<int32_t> keep;
              for (int32_t j = 0; j < in.L; ++j)
                if (!gone[static_cast<size_t>(j)]) keep.push_back(j);
              EXPECT_EQ(keep_mask(keep, in.L), layers[static_cast<size_t>(l)].at("keep_mask")[static_cast<size_t>(h)])
                  << (m == &ours ? "C++ metric" : "reference metric") << " layer " << l << " head " << h;
            }
        }
        continue;
      }

      for (int32_t l = 0; l < in.N; ++l) {
        const json& lj = layers[static_cast<size_t>(l)];
        auto s = compute_layer_scores(c, l, in.layer(l));
        ASSERT_TRUE(s.has_value()) << s.status().message();
        const HeadScores ref_scores = blob_rows(expected, lj.at("scores"));
        expect_scores_close(s->scores, ref_scores, name + " scores", &exact, &total);
        LayerScores ref = *s;
        ref.scores = ref_scores;
        if (lj.contains("crit")) {
          const HeadScores ref_crit = blob_rows(expected, lj.at("crit"));
          expect_scores_close(s->crit, ref_crit, name + " crit", &exact, &total);
          ref.crit = ref_crit;
        }
        const int32_t bs = layer_selection_budget(c, in.N, l, in.L);
        EXPECT_EQ(bs, lj.at("selection_budget").get<int32_t>()) << "layer " << l;
        for (const LayerScores* sc : {&*s, &ref}) {
          const char* which = sc == &ref ? "reference scores" : "C++ scores";
          const LayerPlan plan = plan_layer(c, l, bs, *sc);
          EXPECT_EQ(plan.budgets, lj.at("budgets").get<std::vector<int32_t>>()) << which << " layer " << l;
          if (lj.contains("counts")) {
            EXPECT_EQ(plan.counts, lj.at("counts").get<std::vector<int32_t>>()) << which;
          }
          for (int32_t h = 0; h < in.hkv; ++h)
            EXPECT_EQ(keep_mask(plan.keep[static_cast<size_t>(h)], in.L), lj.at("keep_mask")[static_cast<size_t>(h)])
                << which << " layer " << l << " head " << h;
        }
      }
    }
  }
  EXPECT_GT(cases, 300);
  // Both sides round one float64 result to fp32: nearly all scores are bit-identical.
  EXPECT_GT(exact, total * 99 / 100) << exact << " of " << total << " scores bit-identical";
  std::printf("compress fixtures: %d cases, %d of %d scores bit-identical\n", cases, exact, total);
}

}  // namespace
}  // namespace adakv
