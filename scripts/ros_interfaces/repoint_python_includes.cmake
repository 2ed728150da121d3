# Passed with -DCMAKE_PROJECT_INCLUDE=<this file> to CMake builds of ROS interface packages against
# the ROS 2 wheels from PyPI (tf2_msgs here, composition_interfaces in the launch underlay), so the
# packages' own sources stay unmodified.
#
# The Python type support targets exported by those wheels carry the include directories of the
# machine that built them (for example /opt/python/cp311-cp311/include/python3.11). At the end of
# the top-level CMakeLists.txt (after every find_package), every include directory that does not
# exist here is replaced by the Python and NumPy include directories of the interpreter this build
# uses (Python3_EXECUTABLE), so the build works for any Python 3.10-3.12.
if(CMAKE_VERSION VERSION_LESS 3.19)
  message(FATAL_ERROR "repoint_python_includes.cmake needs CMake 3.19 or later (cmake_language(DEFER))")
endif()

function(vlm3_repoint_python_includes)
  find_package(Python3 REQUIRED COMPONENTS Interpreter Development.Module NumPy)
  get_directory_property(_vlm3_imported_targets DIRECTORY "${CMAKE_SOURCE_DIR}" IMPORTED_TARGETS)
  foreach(_target IN LISTS _vlm3_imported_targets)
    get_target_property(_dirs ${_target} INTERFACE_INCLUDE_DIRECTORIES)
    if(NOT _dirs)
      continue()
    endif()
    set(_kept "")
    set(_dropped FALSE)
    foreach(_dir IN LISTS _dirs)
      if(_dir MATCHES "^\\$<" OR EXISTS "${_dir}")
        list(APPEND _kept "${_dir}")
      else()
        set(_dropped TRUE)
      endif()
    endforeach()
    if(_dropped)
      list(APPEND _kept ${Python3_INCLUDE_DIRS} ${Python3_NumPy_INCLUDE_DIRS})
      list(REMOVE_DUPLICATES _kept)
      message(STATUS "Repointed include directories of ${_target}")
      set_target_properties(${_target} PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${_kept}")
    endif()
  endforeach()
endfunction()

cmake_language(DEFER DIRECTORY "${CMAKE_SOURCE_DIR}" CALL vlm3_repoint_python_includes)
