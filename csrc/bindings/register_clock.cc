#include <pybind11/pybind11.h>

#include "sluice/clock.h"
#include "status_error.h"

namespace py = pybind11;

namespace sluice::bindings {

void register_clock(py::module_& m) {
  m.def("monotonic_ns", &MonotonicNowNs,
        "Nanoseconds on the core's monotonic clock (the clock every timestamp uses).");
}

}  // namespace sluice::bindings
