#!/usr/bin/env bash
# Ascend NPU environment for DeepSeek-VL2 training (Atlas 800T A2, CANN + torch_npu).
#
#   source recipe/npu_env.sh                        # set the variables in this shell (values already set are kept)
#   recipe/npu_env.sh --write-deepspeed-env [FILE]  # write them to FILE (default ./${DS_ENV_FILE:-.deepspeed_env})
#   recipe/npu_env.sh --list                        # print each variable, its value and what it means
#
# Why a .deepspeed_env file: when `deepspeed --hostfile ...` starts ranks on other hosts (pdsh/ssh), it forwards only
# variables whose names start with MLFLOW, PYTHON, MV2, UCX plus the accelerator's prefixes (NPU: ASCEND, HCCL,
# LD_LIBRARY, PATH), and then every KEY=VALUE line of ~/.deepspeed_env and ./.deepspeed_env (DS_ENV_FILE renames the
# file). TASK_QUEUE_ENABLE, CPU_AFFINITY_CONF, PYTORCH_NPU_ALLOC_CONF, ACLNN_CACHE_LIMIT, ... match no prefix, so
# without the file they would be set on the launching host only. (deepspeed/launcher/runner.py, DeepSpeed 0.19.8.)
# The file must hold only KEY=VALUE lines: DeepSpeed splits every line on '=', so a comment or blank line aborts the
# launch. Single-host runs and the no-ssh launch (one `deepspeed --no_ssh --node_rank N` per host) do not read the
# file: each rank inherits the shell that started it, so source this script in that shell.
#
# Values: what the original MindSpeed-MM DeepSeek-VL2 recipe exports (examples/deepseekvl2/finetune_deepseekvl2.sh
# and the variable table of its README), otherwise the runtime's documented default. Meanings follow the CANN and
# Ascend Extension for PyTorch environment-variable references (hiascend.com).

# NAME|DEFAULT|MEANING (one line each; the --list output and docs/scale_out.md show the same table)
_DSVL2_NPU_VARS=(
  "DS_ACCELERATOR|npu|DeepSpeed accelerator: Ascend NPU, HCCL collectives (recipe code asks deepspeed.accelerator for devices)"
  "HCCL_CONNECT_TIMEOUT|1200|Seconds HCCL waits while building socket links between devices at communicator setup (runtime default 120, range 120-7200); large jobs need more"
  "HCCL_EXEC_TIMEOUT|1800|Seconds a device waits inside a collective for the other devices to arrive, e.g. while one rank saves a checkpoint (A2 default 1836; 0 = never time out)"
  "TASK_QUEUE_ENABLE|2|Operator dispatch queue: 0 off, 1 level-1 (host dispatch split over two threads), 2 level-2 (adds load balancing; recommended; may raise peak memory slightly)"
  "CPU_AFFINITY_CONF|1|Bind each rank's host threads to CPU cores of its NPU's share: 0 off, 1 coarse (all threads in the share), 2 fine (hot threads pinned to fixed cores)"
  "PYTORCH_NPU_ALLOC_CONF|expandable_segments:True|Caching-allocator options: expandable segments (virtual-memory growth) cut fragmentation across variable sequence lengths"
  "ACLNN_CACHE_LIMIT|100000|Host-side cache entries per thread for aclnn operator info (workspace, tiling); default 10000; more helps dynamic shapes at about 2 KB host memory per entry"
  "MULTI_STREAM_MEMORY_REUSE|1|Let the compute stream reuse memory released by collectives on the communication stream without waiting for lazy cross-stream frees (0 off, 1 on = default)"
  "COMBINED_ENABLE|1|Optimise combined non-contiguous operator patterns (0 off, 1 on)"
  "NPU_ASD_ENABLE|0|Silent-data-corruption (feature value) detection in torch_npu: 0 off, 1 log anomalies, 2 log and raise alarms, 3 also record process data in device logs"
  "ASCEND_LAUNCH_BLOCKING|0|1 runs every operator synchronously (debugging only: slow, and disables the task queue); 0 asynchronous"
  "ASCEND_GLOBAL_LOG_LEVEL|3|CANN application log level: 0 debug, 1 info, 2 warning, 3 error, 4 none"
  "ASCEND_SLOG_PRINT_TO_STDOUT|0|1 prints CANN logs to stdout instead of the log files under ~/ascend/log"
  "TOKENIZERS_PARALLELISM|false|Keep the HF tokenizers thread pool off in forked data-loader workers (avoids fork-after-threads deadlock warnings)"
)

_dsvl2_npu_apply() {
  local entry name default
  for entry in "${_DSVL2_NPU_VARS[@]}"; do
    IFS='|' read -r name default _ <<<"$entry"
    if [[ -z "${!name+set}" ]]; then
      export "$name=$default"
    else
      export "${name?}"
    fi
  done
  # The CANN toolkit's own variables (library paths, ASCEND_TOOLKIT_HOME, ...), when it is installed here and not
  # sourced yet. On a CPU host nothing happens.
  local cann="${ASCEND_HOME:-/usr/local/Ascend}/ascend-toolkit/set_env.sh"
  if [[ -z "${ASCEND_TOOLKIT_HOME:-}" && -f "$cann" ]]; then
    # shellcheck disable=SC1090
    source "$cann"
  fi
}

_dsvl2_npu_write_deepspeed_env() {
  local name_="${DS_ENV_FILE:-.deepspeed_env}" file tmp entry name
  [[ "$name_" == /* ]] || name_="./$name_"  # DeepSpeed joins a relative DS_ENV_FILE to ./ and ~/, keeps an absolute one
  file="${1:-$name_}"
  tmp="$(mktemp "${file}.XXXXXX")" || return 1
  # keep lines of other variables; ours are rewritten with the current values
  if [[ -f "$file" ]]; then
    local line keep
    while IFS= read -r line || [[ -n "$line" ]]; do
      [[ -z "$line" || "$line" != *=* ]] && continue
      keep=1
      for entry in "${_DSVL2_NPU_VARS[@]}"; do
        [[ "${line%%=*}" == "${entry%%|*}" ]] && keep=0 && break
      done
      [[ $keep == 1 ]] && printf '%s\n' "$line" >>"$tmp"
    done <"$file"
  fi
  for entry in "${_DSVL2_NPU_VARS[@]}"; do
    name="${entry%%|*}"
    printf '%s=%s\n' "$name" "${!name}" >>"$tmp"
  done
  mv -f "$tmp" "$file"
  echo "wrote $(grep -c '=' "$file") variables to $file (read by the deepspeed launcher from ./ or ~/)"
}

_dsvl2_npu_list() {
  local entry name default meaning
  for entry in "${_DSVL2_NPU_VARS[@]}"; do
    IFS='|' read -r name default meaning <<<"$entry"
    printf '%-28s %-26s %s\n' "$name" "${!name}" "$meaning"
  done
}

_dsvl2_npu_apply

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  set -euo pipefail
  case "${1:-}" in
    --write-deepspeed-env) _dsvl2_npu_write_deepspeed_env "${2:-}" ;;
    --list) _dsvl2_npu_list ;;
    -h|--help|"")
      sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
      [[ -n "${1:-}" ]] || exit 2 ;;
    *) echo "unknown option: $1 (use --write-deepspeed-env [FILE] or --list)" >&2; exit 2 ;;
  esac
fi
