# The Python binding's tests (included from tests/CMakeLists.txt), label "python". Plain
# builds only: the extension links the plain build's libsluice.a, and running an
# ASan/TSan-instrumented extension would need the sanitizer runtime preloaded into the
# interpreter (see docs/design.md, "Python binding").
#   python_install          fixture: builds the extension into build/python-venv (install.sh)
#   python_<file>           one test per bindings/python/tests/test_*.py (stdlib unittest)
#   bench_python_quick      bench/python_bench.py --quick: the benchmark's harness and checks
if(NOT SL_SANITIZE)
  set(SL_PY_DIR ${PROJECT_SOURCE_DIR}/bindings/python)
  set(SL_PY ${CMAKE_BINARY_DIR}/python-venv/bin/python)
  add_test(NAME python_install COMMAND bash ${SL_PY_DIR}/install.sh ${CMAKE_BINARY_DIR})
  set_tests_properties(python_install PROPERTIES FIXTURES_SETUP sluice_python LABELS python
                       TIMEOUT 300)
  file(GLOB SL_PY_TESTS CONFIGURE_DEPENDS ${SL_PY_DIR}/tests/test_*.py)
  foreach(src ${SL_PY_TESTS})
    get_filename_component(name ${src} NAME_WE)
    add_test(NAME python_${name} COMMAND ${SL_PY} -m unittest -v ${name}
             WORKING_DIRECTORY ${SL_PY_DIR}/tests)
    set_tests_properties(python_${name} PROPERTIES FIXTURES_REQUIRED sluice_python
                         LABELS python TIMEOUT 120
                         ENVIRONMENT "SLUICED=$<TARGET_FILE:sluiced>;PYTHONDONTWRITEBYTECODE=1")
  endforeach()
  add_test(NAME bench_python_quick COMMAND ${SL_PY} ${PROJECT_SOURCE_DIR}/bench/python_bench.py --quick)
  set_tests_properties(bench_python_quick PROPERTIES FIXTURES_REQUIRED sluice_python
                       LABELS python TIMEOUT 120 ENVIRONMENT "PYTHONDONTWRITEBYTECODE=1")
endif()
