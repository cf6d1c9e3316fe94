# Tests against a real redis-server: every tests/unit/test_redis*.c. Included from
# tests/CMakeLists.txt after the loop that makes one target per test file (SL_TESTS); this
# only adds to those targets: hiredis and the fixture that starts a private server
# (redis_fixture.c). They get the label "redis" (and keep "concurrency" if they have it).
if(NOT TARGET PkgConfig::HIREDIS)
  pkg_check_modules(HIREDIS REQUIRED IMPORTED_TARGET hiredis)
endif()
find_program(SL_REDIS_SERVER redis-server REQUIRED)
foreach(src ${SL_TESTS})
  get_filename_component(name ${src} NAME_WE)
  if(name MATCHES "^test_redis")
    target_sources(${name} PRIVATE ${CMAKE_CURRENT_LIST_DIR}/redis_fixture.c)
    target_link_libraries(${name} PRIVATE PkgConfig::HIREDIS)
    if(name MATCHES "concurrency") # also run under ThreadSanitizer
      set_tests_properties(${name} PROPERTIES LABELS "redis;concurrency")
    else()
      set_tests_properties(${name} PROPERTIES LABELS redis)
    endif()
  endif()
endforeach()
