// safetensors parsing: values read back through the mapping, and every malformed header refused
// with a one-line message that names the file and the problem.
#include "io/safetensors.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "safetensors_test_writer.h"

namespace adakv {
namespace {

using testing::le_bytes;
using testing::raw_image;
using testing::safetensors_image;
using testing::TempDir;
using testing::TestTensor;
using testing::write_file;

std::vector<float> to_f32(const TensorInfo& t) {
  std::vector<float> out(static_cast<size_t>(t.numel()));
  convert_to_f32(t.dtype, t.data, out.data(), out.size());
  return out;
}

TEST(Safetensors, ReadsBackEveryDtypeThroughTheMapping) {
  TempDir dir;
  // Raw bit patterns written by hand, so the check does not lean on dtype.h's encoders.
  // bf16: 1.0 = 0x3F80, -0.5 = 0xBF00, 3.140625 = 0x4049, 256 = 0x4380, -inf = 0xFF80, 2^-133 = 0x0001
  const std::vector<uint16_t> bf16 = {0x3F80, 0xBF00, 0x4049, 0x4380, 0xFF80, 0x0001};
  // f16: 1.0 = 0x3C00, -2.0 = 0xC000, 0.5 = 0x3800, 65504 = 0x7BFF, 1/3 ~ 0x3555 = 0.333251953125,
  // smallest subnormal 0x0001 = 2^-24
  const std::vector<uint16_t> f16 = {0x3C00, 0xC000, 0x3800, 0x7BFF, 0x3555, 0x0001};
  const std::vector<float> f32 = {1.5f, -2.25f, 3e-8f, 65504.0f};
  const std::vector<int32_t> i32 = {-7, 123456};
  const std::vector<int64_t> i64 = {int64_t{1} << 40, -1};
  const auto image = safetensors_image({{"a.bf16", "BF16", {2, 3}, le_bytes(bf16)},
                                        {"b.f16", "F16", {6}, le_bytes(f16)},
                                        {"c.f32", "F32", {2, 1, 2}, le_bytes(f32)},
                                        {"d.i32", "I32", {2}, le_bytes(i32)},
                                        {"e.i64", "I64", {2}, le_bytes(i64)},
                                        {"f.scalar", "F32", {}, le_bytes(std::vector<float>{7.0f})},
                                        {"g.empty", "BF16", {0, 4096}, {}}},
                                       R"({"format":"pt"})");
  write_file(dir.path() / "model.safetensors", image);

  auto file = SafetensorsFile::open(dir.file("model.safetensors"));
  ASSERT_TRUE(file) << file.status().message();
  const auto& tensors = (*file)->tensors();
  ASSERT_EQ(tensors.size(), 7u);  // __metadata__ is not a tensor

  const TensorInfo* a = (*file)->find("a.bf16");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->dtype, DType::kBF16);
  EXPECT_EQ(a->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(a->numel(), 6);
  EXPECT_EQ(a->nbytes(), 12u);
  const auto av = to_f32(*a);
  EXPECT_EQ(av[0], 1.0f);
  EXPECT_EQ(av[1], -0.5f);
  EXPECT_EQ(av[2], 3.140625f);
  EXPECT_EQ(av[3], 256.0f);
  EXPECT_EQ(av[4], -std::numeric_limits<float>::infinity());
  EXPECT_EQ(av[5], std::ldexp(1.0f, -133));

  const TensorInfo* b = (*file)->find("b.f16");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->dtype, DType::kF16);
  const auto bv = to_f32(*b);
  EXPECT_EQ(bv, (std::vector<float>{1.0f, -2.0f, 0.5f, 65504.0f, 0.333251953125f, std::ldexp(1.0f, -24)}));

  const TensorInfo* c = (*file)->find("c.f32");
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->shape, (std::vector<int64_t>{2, 1, 2}));
  EXPECT_EQ(to_f32(*c), f32);

  const TensorInfo* d = (*file)->find("d.i32");
  ASSERT_NE(d, nullptr);
  EXPECT_EQ(d->dtype, DType::kI32);
  int32_t d1 = 0;
  std::memcpy(&d1, d->data + 4, 4);
  EXPECT_EQ(d1, 123456);

  const TensorInfo* e = (*file)->find("e.i64");
  ASSERT_NE(e, nullptr);
  int64_t e0 = 0;
  std::memcpy(&e0, e->data, 8);
  EXPECT_EQ(e0, int64_t{1} << 40);

  const TensorInfo* s = (*file)->find("f.scalar");
  ASSERT_NE(s, nullptr);
  EXPECT_TRUE(s->shape.empty());
  EXPECT_EQ(s->numel(), 1);
  EXPECT_EQ(to_f32(*s)[0], 7.0f);

  const TensorInfo* g = (*file)->find("g.empty");
  ASSERT_NE(g, nullptr);
  EXPECT_EQ(g->numel(), 0);
  EXPECT_EQ(g->nbytes(), 0u);

  // Data pointers are views into one mapping, at the header's offsets (no copies).
  EXPECT_EQ(b->data - a->data, static_cast<ptrdiff_t>(b->begin - a->begin));
  EXPECT_EQ(e->data - a->data, static_cast<ptrdiff_t>(e->begin - a->begin));
  EXPECT_EQ((*file)->find("missing"), nullptr);
}

TEST(Safetensors, BufferParseMatchesHeaderOffsets) {
  const std::vector<float> x = {1, 2, 3, 4, 5, 6};
  const auto image = safetensors_image({{"x", "F32", {2, 3}, le_bytes(x)}, {"y", "F32", {1}, le_bytes(std::vector<float>{9})}});
  auto tensors = parse_safetensors_buffer(image.data(), image.size(), "mem.safetensors");
  ASSERT_TRUE(tensors) << tensors.status().message();
  const TensorInfo& y = tensors->at("y");
  EXPECT_EQ(y.begin, 24u);
  EXPECT_EQ(y.end, 28u);
  // The data section starts right after the padded header; y sits 24 bytes into it.
  EXPECT_EQ(y.data, image.data() + image.size() - 4);
  float y0 = 0;
  std::memcpy(&y0, y.data, 4);
  EXPECT_EQ(y0, 9.0f);
}

TEST(Safetensors, HeaderParseAloneLeavesDataUnset) {
  const std::string header = R"({"w":{"dtype":"F16","shape":[3],"data_offsets":[2,8]}})";
  auto tensors = parse_safetensors_header(reinterpret_cast<const uint8_t*>(header.data()), header.size(), 8, "h");
  ASSERT_TRUE(tensors) << tensors.status().message();
  EXPECT_EQ(tensors->at("w").begin, 2u);
  EXPECT_EQ(tensors->at("w").data, nullptr);
}

// --- refusals ------------------------------------------------------------------------------

// Writes `bytes` as bad.safetensors and opens it through the real file path.
Status open_bytes(const std::vector<uint8_t>& bytes) {
  TempDir dir;
  write_file(dir.path() / "bad.safetensors", bytes);
  auto f = SafetensorsFile::open(dir.file("bad.safetensors"));
  if (f) return Status::ok();
  return f.status();
}

Status open_header(const std::string& header, size_t data_bytes) {
  return open_bytes(raw_image(header, std::vector<uint8_t>(data_bytes, 0)));
}

// Every refusal: non-ok, names the file, one line, and says what is wrong.
void expect_refused(const Status& s, const std::string& phrase, StatusCode code = StatusCode::kDataLoss) {
  ASSERT_FALSE(s.is_ok()) << "expected a refusal mentioning: " << phrase;
  EXPECT_EQ(s.code(), code) << s.message();
  EXPECT_NE(s.message().find("bad.safetensors"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find(phrase), std::string::npos) << s.message();
  EXPECT_EQ(s.message().find('\n'), std::string::npos) << s.message();
}

TEST(SafetensorsErrors, FileShorterThanLengthPrefix) {
  expect_refused(open_bytes({}), "shorter than the 8-byte header length");
  expect_refused(open_bytes({1, 2, 3, 4, 5}), "5 bytes, shorter than the 8-byte header length");
}

TEST(SafetensorsErrors, HeaderLengthPastEndOfFile) {
  auto image = raw_image("{}", {});
  image[0] = 200;  // claims a 200-byte header in a 10-byte file
  expect_refused(open_bytes(image), "header length 200 runs past the end of the file (10 bytes)");
  // A length near 2^64 must not wrap around when added to the prefix size.
  std::vector<uint8_t> huge = {0xf9, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, '{', '}'};
  expect_refused(open_bytes(huge), "runs past the end of the file");
}

TEST(SafetensorsErrors, HeaderNotJsonOrNotAnObject) {
  expect_refused(open_header("{\"a\": ", 0), "header is not valid JSON");
  expect_refused(open_header("\xff\xfe", 0), "header is not valid JSON");
  expect_refused(open_header("[1, 2]", 0), "header is a JSON array, not an object");
  expect_refused(open_header("\"x\"", 0), "not an object");
  expect_refused(open_header(R"({"w": 5})", 0), "tensor 'w' is a number, not an object");
}

TEST(SafetensorsErrors, UnsupportedDtypes) {
  expect_refused(open_header(R"({"w":{"dtype":"F8_E4M3","shape":[4],"data_offsets":[0,4]}})", 4),
                 "dtype F8_E4M3 not supported", StatusCode::kUnimplemented);
  expect_refused(open_header(R"({"w":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})", 8),
                 "dtype F64 not supported", StatusCode::kUnimplemented);
  expect_refused(open_header(R"({"w":{"dtype":"bf16","shape":[1],"data_offsets":[0,2]}})", 2),
                 "dtype bf16 not supported", StatusCode::kUnimplemented);
  expect_refused(open_header(R"({"w":{"dtype":7,"shape":[1],"data_offsets":[0,2]}})", 2), "dtype is not a string");
}

TEST(SafetensorsErrors, MissingFields) {
  expect_refused(open_header(R"({"w":{"shape":[1],"data_offsets":[0,4]}})", 4), "tensor 'w' has no dtype");
  expect_refused(open_header(R"({"w":{"dtype":"F32","data_offsets":[0,4]}})", 4), "tensor 'w' has no shape");
  expect_refused(open_header(R"({"w":{"dtype":"F32","shape":[1]}})", 4), "tensor 'w' has no data_offsets");
  expect_refused(open_header(R"({"w":{"dtype":"F32","shape":4,"data_offsets":[0,4]}})", 4), "shape is not an array");
}

TEST(SafetensorsErrors, BadShapeEntries) {
  expect_refused(open_header(R"({"w":{"dtype":"F32","shape":[-1,4],"data_offsets":[0,16]}})", 16),
                 "negative shape entry -1");
  expect_refused(open_header(R"({"w":{"dtype":"F32","shape":[2.5],"data_offsets":[0,10]}})", 10),
                 "non-integer shape entry 2.5");
  expect_refused(open_header(R"({"w":{"dtype":"F32","shape":["4"],"data_offsets":[0,16]}})", 16),
                 "non-integer shape entry \"4\"");
  expect_refused(open_header(R"({"w":{"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,4]}})", 4),
                 "overflows int64");
}

TEST(SafetensorsErrors, HugeDimsOverflowInsteadOfWrapping) {
  // 2^32 * 2^32 wraps to 0 in 64 bits, which would match data_offsets [0,0] if unchecked.
  expect_refused(open_header(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})", 0),
                 "overflows a 64-bit element or byte count");
  // numel fits but numel * 4 bytes wraps to 0.
  expect_refused(open_header(R"({"w":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,0]}})", 0),
                 "overflows a 64-bit element or byte count");
  // A zero dimension makes any other dimension harmless.
  EXPECT_TRUE(open_header(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}})", 0)
                  .is_ok());
}

// Found by fuzz_safetensors_header (UBSan): the parser accepts huge dimensions before a 0, and
// numel() multiplied them in order, overflowing int64 before reaching the 0.
TEST(Safetensors, EmptyTensorWithHugeDimsHasNoElements) {
  const std::string header =
      R"({"w":{"dtype":"I64","shape":[94744,207,7095516,51,2947,51,294796044440016,0],"data_offsets":[0,0]}})";
  auto tensors = parse_safetensors_header(reinterpret_cast<const uint8_t*>(header.data()), header.size(), 0, "h");
  ASSERT_TRUE(tensors) << tensors.status().message();
  EXPECT_EQ(tensors->at("w").numel(), 0);
  EXPECT_EQ(tensors->at("w").nbytes(), 0u);
}

TEST(SafetensorsErrors, DataOffsetsNotANonDecreasingPair) {
  const char* phrase = "is not a pair of non-decreasing non-negative integers";
  expect_refused(open_header(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}})", 8), phrase);
  expect_refused(open_header(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[4]}})", 8), phrase);
  expect_refused(open_header(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}})", 8), phrase);
  expect_refused(open_header(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}})", 8), phrase);
  expect_refused(open_header(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":["0","4"]}})", 8), phrase);
  expect_refused(open_header(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":{"a":1}}})", 8), phrase);
}

TEST(SafetensorsErrors, TensorPastTheDataSection) {
  expect_refused(open_header(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 10),
                 "truncated: tensor w needs bytes [0,16) but the data section has 10 bytes");
}

TEST(SafetensorsErrors, TruncatedRealFile) {
  const std::vector<float> x(64, 1.0f);
  auto image = safetensors_image({{"first", "F32", {8}, le_bytes(std::vector<float>(8, 2.0f))},
                                  {"model.norm.weight", "F32", {64}, le_bytes(x)}});
  ASSERT_TRUE(open_bytes(image).is_ok());
  const size_t data_bytes = 4 * (8 + 64);
  image.erase(image.end() - 100, image.end());  // a download that stopped early
  expect_refused(open_bytes(image), "truncated: tensor model.norm.weight needs bytes [32,288) but the data section has " +
                                        std::to_string(data_bytes - 100) + " bytes");
}

TEST(SafetensorsErrors, ShapeThatLiesAboutTheByteSize) {
  expect_refused(open_header(R"({"w":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,16]}})", 16),
                 "tensor 'w': shape [2, 3] of BF16 needs 12 bytes but data_offsets [0,16) hold 16");
  expect_refused(open_header(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}})", 16),
                 "needs 16 bytes but data_offsets [0,8) hold 8");
}

TEST(SafetensorsErrors, OverlappingTensors) {
  expect_refused(open_header(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                             R"("b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
                             16),
                 "tensors 'a' [0,16) and 'b' [8,16) overlap");
  // Same range twice (two names aliasing one buffer) is an overlap too.
  expect_refused(open_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                             R"("b":{"dtype":"I32","shape":[2],"data_offsets":[0,8]}})",
                             8),
                 "overlap");
  // Touching ranges and empty tensors anywhere are fine.
  EXPECT_TRUE(open_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                          R"("b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},)"
                          R"("c":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}})",
                          16)
                  .is_ok());
}

TEST(SafetensorsErrors, DuplicateTensorName) {
  expect_refused(open_header(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                             R"("a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
                             4),
                 "header names tensor 'a' twice");
}

TEST(SafetensorsErrors, NamesWithControlCharactersStayOnOneLine) {
  // JSON "\n" in a key decodes to a newline; the message shows it escaped.
  expect_refused(open_header(R"({"a\nb":{"shape":[1],"data_offsets":[0,4]}})", 4), "tensor 'a\\x0ab' has no dtype");
  expect_refused(open_header(R"({"w":{"dtype":"F\r8","shape":[1],"data_offsets":[0,4]}})", 4),
                 "dtype F\\x0d8 not supported", StatusCode::kUnimplemented);
}

TEST(Safetensors, MetadataAndPaddingAccepted) {
  // Trailing spaces pad the header; __metadata__ may hold anything and is ignored; gaps and
  // trailing bytes after the last tensor are allowed.
  const std::string header =
      R"({"__metadata__":{"format":"pt","n":"1"},"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})"
      "       ";
  std::vector<uint8_t> data(12, 0);
  const float v = 2.5f;
  std::memcpy(data.data() + 4, &v, 4);
  EXPECT_TRUE(open_bytes(raw_image(header, data)).is_ok());
  // An empty header is a valid file with no tensors.
  EXPECT_TRUE(open_bytes(raw_image("{}", {})).is_ok());
}

TEST(SafetensorsErrors, MissingFileIsNotFound) {
  TempDir dir;
  auto f = SafetensorsFile::open(dir.file("nope.safetensors"));
  ASSERT_FALSE(f);
  EXPECT_EQ(f.status().code(), StatusCode::kNotFound);
  EXPECT_NE(f.status().message().find("nope.safetensors"), std::string::npos);
}

}  // namespace
}  // namespace adakv
