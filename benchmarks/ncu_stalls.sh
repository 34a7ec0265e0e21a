#!/bin/bash
# Stall reasons and pipe use of the compressed-tier decode kernel (Llama-3-8B shape, B=8,
# T=32k), one ncu pass per CODED setting given: bash benchmarks/ncu_stalls.sh "" "programs_per_sm=3"
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "ncu not found"; exit 1; }
reasons="long_scoreboard short_scoreboard mio_throttle lg_throttle wait math_pipe_throttle not_selected selected barrier dispatch_stall no_instruction drain branch_resolving tex_throttle misc"
metrics="sm__warps_active.avg.pct_of_peak_sustained_active,smsp__issue_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum,launch__registers_per_thread,launch__occupancy_limit_registers,launch__occupancy_limit_shared_mem,sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active,l1tex__throughput.avg.pct_of_peak_sustained_active,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum,l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum,l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,gpu__time_duration.sum"
for r in $reasons; do metrics="$metrics,smsp__average_warps_issue_stalled_${r}_per_issue_active.ratio"; done
for setting in "$@"; do
  echo "=== setting: ${setting:-defaults}"
  (cd benchmarks && "$NCU" --kernel-name regex:paged_coded --launch-skip 1 --launch-count 1 --metrics "$metrics" \
     python profile_coded.py $setting 2>&1 | grep -v "Warning\|warn" | tail -40)
done
