# Included by the interface packages here after their find_package() calls.
#
# The Python type support targets exported by the ROS 2 wheels on PyPI carry the include
# directories of the machine that built the wheels (for example /opt/python/cp311-cp311/...).
# Replace every include directory that does not exist here by the Python and NumPy include
# directories of the interpreter this build uses, so the build works for any Python 3.10-3.12.
find_package(Python3 REQUIRED COMPONENTS Interpreter Development.Module NumPy)
get_directory_property(_vlm3_imported_targets IMPORTED_TARGETS)
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
