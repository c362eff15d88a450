// Carries a core Status across the binding as a Python exception.
#pragma once

#include <pybind11/pybind11.h>

#include <stdexcept>

#include "sluice/status.h"

namespace sluice::bindings {

// Thrown by binding code when a core call fails; translated to
// sluice._core.StatusError(code_name, message).
class StatusException : public std::runtime_error {
 public:
  explicit StatusException(Status status)
      : std::runtime_error(status.message()), status_(std::move(status)) {}
  const Status& status() const { return status_; }

 private:
  Status status_;
};

inline void ThrowIfError(const Status& status) {
  if (!status.ok()) throw StatusException(status);
}

void register_status(pybind11::module_& m);
void register_clock(pybind11::module_& m);
void register_bytes_codec(pybind11::module_& m);
void register_batcher(pybind11::module_& m);
void register_drift(pybind11::module_& m);

}  // namespace sluice::bindings
