// Status: the error currency of the C++ core. Codes are transport-neutral; the
// Python server maps them to gRPC status codes at one edge (server/errors).
#pragma once

#include <string>
#include <utility>

namespace sluice {

enum class StatusCode : int {
  kOk = 0,
  kInvalidArgument = 1,
  kNotFound = 2,
  kUnavailable = 3,
  kResourceExhausted = 4,
  kDeadlineExceeded = 5,
  kCancelled = 6,
  kInternal = 7,
};

// Stable lower-case name of a code ("invalid_argument"), shared with Python.
const char* StatusCodeName(StatusCode code);

class Status {
 public:
  Status() = default;  // OK
  Status(StatusCode code, std::string message)
      : code_(code), message_(std::move(message)) {}

  static Status Ok() { return Status(); }
  static Status InvalidArgument(std::string message) {
    return Status(StatusCode::kInvalidArgument, std::move(message));
  }
  static Status Internal(std::string message) {
    return Status(StatusCode::kInternal, std::move(message));
  }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }
  std::string ToString() const;

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

}  // namespace sluice
