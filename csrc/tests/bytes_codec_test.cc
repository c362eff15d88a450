#include "sluice/bytes_codec.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace sluice {
namespace {

std::vector<uint8_t> Encode(const std::vector<std::string_view>& elements) {
  std::vector<uint8_t> out(LengthPrefixedSize(elements));
  EXPECT_TRUE(WriteLengthPrefixed(elements, out.data()).ok());
  return out;
}

TEST(BytesCodecTest, RoundTripsIncludingEmptyAndBinary) {
  const std::string binary("a\0\xff", 3);
  std::vector<std::string_view> elements = {"hello", "", binary};
  std::vector<uint8_t> buf = Encode(elements);
  ASSERT_EQ(buf.size(), 4u + 5u + 4u + 0u + 4u + 3u);
  EXPECT_EQ(buf[0], 5);  // little-endian length
  EXPECT_EQ(buf[1], 0);

  std::vector<ByteSpan> spans;
  ASSERT_TRUE(ParseLengthPrefixed(buf.data(), buf.size(), 3, &spans).ok());
  ASSERT_EQ(spans.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    std::string_view got(reinterpret_cast<const char*>(buf.data()) + spans[i].offset,
                         spans[i].size);
    EXPECT_EQ(got, elements[i]);
  }
}

TEST(BytesCodecTest, ZeroElementsOfEmptyBuffer) {
  std::vector<ByteSpan> spans;
  EXPECT_TRUE(ParseLengthPrefixed(nullptr, 0, 0, &spans).ok());
  EXPECT_TRUE(spans.empty());
}

TEST(BytesCodecTest, RejectsTruncatedPrefix) {
  std::vector<uint8_t> buf = Encode({"ab"});
  buf.resize(buf.size() + 2);  // half a second prefix
  std::vector<ByteSpan> spans;
  Status s = ParseLengthPrefixed(buf.data(), buf.size(), 2, &spans);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("element 1"), std::string::npos) << s.message();
}

TEST(BytesCodecTest, RejectsLengthPastEnd) {
  std::vector<uint8_t> buf = {100, 0, 0, 0, 'x', 'y', 'z'};
  std::vector<ByteSpan> spans;
  Status s = ParseLengthPrefixed(buf.data(), buf.size(), 1, &spans);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "BYTES element 0 declares 100 bytes but only 3 remain");
}

TEST(BytesCodecTest, RejectsHugeLengthWithoutOverflow) {
  std::vector<uint8_t> buf = {0xff, 0xff, 0xff, 0xff, 'x'};
  std::vector<ByteSpan> spans;
  EXPECT_FALSE(ParseLengthPrefixed(buf.data(), buf.size(), 1, &spans).ok());
}

TEST(BytesCodecTest, RejectsTrailingBytes) {
  std::vector<uint8_t> buf = Encode({"ab", "c"});
  std::vector<ByteSpan> spans;
  Status s = ParseLengthPrefixed(buf.data(), buf.size(), 1, &spans);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("after the expected 1 elements"), std::string::npos);
}

TEST(BytesCodecTest, HugeCountDoesNotReserveHugeMemory) {
  std::vector<uint8_t> buf = Encode({"a"});
  std::vector<ByteSpan> spans;
  EXPECT_FALSE(ParseLengthPrefixed(buf.data(), buf.size(), size_t{1} << 60, &spans).ok());
}

TEST(Utf8Test, AcceptsWellFormedText) {
  EXPECT_TRUE(IsValidUtf8(""));
  EXPECT_TRUE(IsValidUtf8("plain ascii"));
  EXPECT_TRUE(IsValidUtf8("caf\xc3\xa9"));          // é
  EXPECT_TRUE(IsValidUtf8("\xe2\x82\xac"));         // €
  EXPECT_TRUE(IsValidUtf8("\xf0\x9f\x98\x80"));     // emoji
}

TEST(Utf8Test, RejectsMalformedText) {
  EXPECT_FALSE(IsValidUtf8("\xff"));
  EXPECT_FALSE(IsValidUtf8("\xc3"));                // truncated
  EXPECT_FALSE(IsValidUtf8("\xc0\xaf"));            // overlong '/'
  EXPECT_FALSE(IsValidUtf8("\xed\xa0\x80"));        // surrogate
  EXPECT_FALSE(IsValidUtf8("\xf4\x90\x80\x80"));    // past U+10FFFF
  EXPECT_FALSE(IsValidUtf8("a\x80" "b"));           // stray continuation
}

}  // namespace
}  // namespace sluice
