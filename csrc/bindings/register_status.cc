#include <pybind11/pybind11.h>

#include "status_error.h"

namespace py = pybind11;

namespace sluice::bindings {

void register_status(py::module_& m) {
  // StatusError.args == (code_name, message); sluice.errors maps code_name to
  // the matching SluiceError subclass.
  static py::exception<StatusException> status_error(m, "StatusError");
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const StatusException& e) {
      py::tuple args = py::make_tuple(StatusCodeName(e.status().code()), e.status().message());
      PyErr_SetObject(status_error.ptr(), args.ptr());
    }
  });
}

}  // namespace sluice::bindings
