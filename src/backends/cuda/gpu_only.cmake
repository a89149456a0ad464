# GPU-only build (-DADAKV_GPU_ONLY=ON): the CUDA kernel library, its GPU tests and the kernel
# benchmarks, nothing that needs adakv_lib's third-party packages (PCRE2, OpenBLAS, httplib),
# which the GPU machine lacks. Used by scripts/gpu_decode_check.sh. Included from the top level.
include(${CMAKE_SOURCE_DIR}/src/backends/cuda/cuda_toolchain.cmake)
find_package(Threads REQUIRED)
add_subdirectory(${CMAKE_SOURCE_DIR}/src/backends/cuda ${CMAKE_BINARY_DIR}/cuda_kernels)

# Kernel tests that need only adakv_cuda_kernels, one program each (each test file carries its
# own fallback main()). Built with GoogleTest when the machine has its libraries.
find_package(GTest QUIET)
function(adakv_gpu_kernel_test name source)
  add_executable(${name} ${CMAKE_SOURCE_DIR}/tests/gpu/${source})
  target_link_libraries(${name} PRIVATE adakv_cuda_kernels Threads::Threads)
  target_compile_definitions(${name} PRIVATE ADAKV_HAVE_CUDA=1)
  if(GTest_FOUND)
    target_link_libraries(${name} PRIVATE GTest::gtest GTest::gtest_main)
  else()
    target_compile_definitions(${name} PRIVATE ADAKV_PLAIN_TEST_MAIN=1)
  endif()
endfunction()
if(GTest_FOUND)
  message(STATUS "adakv GPU-only build: tests use GoogleTest")
else()
  message(STATUS "adakv GPU-only build: GoogleTest not found, tests use their own main()")
endif()
adakv_gpu_kernel_test(adakv_gpu_kernel_tests test_decode_attention.cc)
adakv_gpu_kernel_test(adakv_gpu_prefill_tests test_prefill_attention.cc)

add_subdirectory(${CMAKE_SOURCE_DIR}/bench ${CMAKE_BINARY_DIR}/bench)
