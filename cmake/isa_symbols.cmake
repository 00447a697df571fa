# cmake -P: every symbol an instruction-set path's objects define for the linker is that path's own (in its
# namespace, or a kernel instantiated for it). An inline function or template compiled there under any other name
# (a std:: one, say) could be the copy the linker keeps for the whole library, running the path's instructions on
# a CPU without them. Inputs: NM, ISA_PATH (its name), ISA_INDEX (its CpuIsa value), OBJECTS (;-list).
set(offending)
foreach(object ${OBJECTS})
  execute_process(COMMAND ${NM} -C --defined-only --extern-only ${object} OUTPUT_VARIABLE symbols
                  RESULT_VARIABLE status)
  if(NOT status EQUAL 0)
    message(FATAL_ERROR "nm failed on ${object}")
  endif()
  string(REPLACE "\n" ";" symbols "${symbols}")
  foreach(line ${symbols})
    if(line MATCHES "::${ISA_PATH}::|\\(llama_kernels::cpu::CpuIsa\\)${ISA_INDEX}[,>]|DW\\.ref\\.__gxx_personality_v0")
      continue()
    endif()
    list(APPEND offending "${object}: ${line}")
  endforeach()
endforeach()
if(offending)
  string(REPLACE ";" "\n  " offending "${offending}")
  message(FATAL_ERROR "${ISA_PATH}: symbols outside the path:\n  ${offending}")
endif()
message(STATUS "${ISA_PATH}: every symbol is the path's own")
