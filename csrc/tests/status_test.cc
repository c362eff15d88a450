#include "sluice/status.h"

#include <gtest/gtest.h>

namespace sluice {
namespace {

TEST(StatusTest, DefaultIsOk) {
  Status s;
  EXPECT_TRUE(s.ok());
  EXPECT_EQ(s.ToString(), "ok");
}

TEST(StatusTest, CarriesCodeAndMessage) {
  Status s = Status::InvalidArgument("bad shape");
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.ToString(), "invalid_argument: bad shape");
}

TEST(StatusTest, EveryCodeHasADistinctName) {
  const StatusCode codes[] = {StatusCode::kOk, StatusCode::kInvalidArgument,
                              StatusCode::kNotFound, StatusCode::kUnavailable,
                              StatusCode::kResourceExhausted, StatusCode::kDeadlineExceeded,
                              StatusCode::kCancelled, StatusCode::kInternal};
  for (size_t i = 0; i < std::size(codes); ++i) {
    for (size_t j = i + 1; j < std::size(codes); ++j) {
      EXPECT_STRNE(StatusCodeName(codes[i]), StatusCodeName(codes[j]));
    }
  }
}

}  // namespace
}  // namespace sluice
