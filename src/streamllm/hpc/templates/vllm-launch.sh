#!/bin/bash
# STREAM: vLLM's OpenAI-compatible server as a batch job on a GPU node.
#
# Submit it with either scheduler. Each one reads its own header lines below:
#     sbatch vllm-launch.sh    Slurm. `#SBATCH --ignore-pbs` stops sbatch from also reading #PBS.
#     qsub vllm-launch.sh      PBS Pro / OpenPBS. It treats the #SBATCH lines as comments.
#     bash vllm-launch.sh      By hand on a GPU node, for a test.
# Change the header lines for your site (marked CHANGE:). Scheduler directives cannot read
# variables, so edit them here or override them on the sbatch/qsub command line.
#
# Settings: each CHANGE: variable below has a default, and the environment overrides it:
#     sbatch --export=ALL,STREAM_VLLM_MODEL=meta-llama/Llama-3.1-8B-Instruct vllm-launch.sh
#     qsub -v STREAM_VLLM_MODEL=meta-llama/Llama-3.1-8B-Instruct vllm-launch.sh
# They are named STREAM_VLLM_*, never VLLM_*: vLLM reads VLLM_* variables itself (VLLM_PORT,
# for one, is an internal port of vLLM's, not the API port). The exception is VLLM_API_KEY.
#
# What it does:
#   1. Reads the API key from a file into VLLM_API_KEY, which vLLM reads. The key never
#      appears on a command line, so `ps` does not show it to other users of the node.
#   2. Sets the tensor-parallel size from the number of GPUs the job was given.
#   3. Starts vLLM, then waits until /health answers and /v1/models accepts the key.
#   4. Writes the server's address as the nodes reach it (http://<node>:<port>/v1) to
#      STREAM_VLLM_URL_FILE on the shared filesystem. That line is the cluster's `base_url` in
#      the gateway's configuration. The file is removed when the job ends.
#   5. On SIGTERM (scancel, qdel, the end of the walltime) it stops vLLM cleanly.
#
# vLLM checks the key only on its API routes (/v1 and a few other prefixes). Other routes of
# the same server answer anyone who can reach the port, so keep the port inside the cluster.
#
# ---- Slurm (sbatch) ---- CHANGE: account, partition, GPUs, CPUs, memory, time, log file.
# --signal: SIGTERM to this script 120 s before the time limit, so vLLM stops cleanly.
#SBATCH --ignore-pbs
#SBATCH --job-name=stream-vllm
#SBATCH --account=stream-svc
#SBATCH --partition=gpu
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=32
#SBATCH --mem=256G
#SBATCH --time=7-00:00:00
#SBATCH --signal=B:TERM@120
#SBATCH --output=stream-vllm-%j.log
#
# ---- PBS Pro (qsub) ---- CHANGE: project, queue, GPUs, CPUs, memory, walltime.
#PBS -N stream-vllm
#PBS -A stream-svc
#PBS -q gpu
#PBS -l select=1:ncpus=32:ngpus=4:mem=256gb
#PBS -l walltime=168:00:00
#PBS -j oe
#PBS -r n

set -euo pipefail

# ---- Settings ---------------------------------------------------------------------------------
# CHANGE: the model as vLLM loads it (a Hugging Face name, or a path to the weights).
STREAM_VLLM_MODEL="${STREAM_VLLM_MODEL:-meta-llama/Llama-3.1-70B-Instruct}"
# CHANGE: the name users send, listed in the gateway's `models`. Empty: the same as the model.
STREAM_VLLM_SERVED_MODEL_NAME="${STREAM_VLLM_SERVED_MODEL_NAME:-}"
# CHANGE: the port, and the address to bind (0.0.0.0: every interface of the node).
STREAM_VLLM_PORT="${STREAM_VLLM_PORT:-8000}"
STREAM_VLLM_HOST="${STREAM_VLLM_HOST:-0.0.0.0}"
# CHANGE: the node's name as the worker nodes reach it. Empty: `hostname -f`.
STREAM_VLLM_ADVERTISE_HOST="${STREAM_VLLM_ADVERTISE_HOST:-}"
# CHANGE: the key file, readable by the service account only (chmod 600).
STREAM_VLLM_API_KEY_FILE="${STREAM_VLLM_API_KEY_FILE:-/shared/stream/secrets/vllm.key}"
# CHANGE: where to write the base URL: on a filesystem the login node and the admin can read.
STREAM_SHARED_DIR="${STREAM_SHARED_DIR:-/shared/stream}"
STREAM_VLLM_URL_FILE="${STREAM_VLLM_URL_FILE:-$STREAM_SHARED_DIR/vllm-base-url}"
# CHANGE: the virtualenv that holds vLLM. Set but empty: use whatever `vllm` is on PATH (a
# module, a container's environment).
STREAM_VLLM_VENV="${STREAM_VLLM_VENV-/shared/vllm/venv}"
# CHANGE: the tensor-parallel size. Empty: the number of GPUs the job got, rounded down to a
# power of two (the attention heads must divide evenly across the GPUs).
STREAM_VLLM_TP_SIZE="${STREAM_VLLM_TP_SIZE:-}"
# CHANGE: the most sequences vLLM runs at once. STREAM sends up to agents.max x
# agents.max_concurrency requests through warm agents, plus one per per-request worker. vLLM
# queues any beyond this number itself.
STREAM_VLLM_MAX_NUM_SEQS="${STREAM_VLLM_MAX_NUM_SEQS:-128}"
# CHANGE: the context length. Empty: the model's own. Lower it if the KV cache does not fit.
STREAM_VLLM_MAX_MODEL_LEN="${STREAM_VLLM_MAX_MODEL_LEN:-}"
STREAM_VLLM_GPU_MEMORY_UTILIZATION="${STREAM_VLLM_GPU_MEMORY_UTILIZATION:-0.90}"
# CHANGE: more vLLM options, split on spaces. Older vLLM releases log every prompt unless
# started with --disable-log-requests. Newer ones log prompts only with --enable-log-requests.
# Check which applies to your version.
STREAM_VLLM_EXTRA_ARGS="${STREAM_VLLM_EXTRA_ARGS:-}"
# CHANGE: how long loading may take before the job gives up (large models, slow filesystems).
STREAM_VLLM_HEALTH_TIMEOUT_S="${STREAM_VLLM_HEALTH_TIMEOUT_S:-1800}"
# How long vLLM gets to stop after SIGTERM before it is killed. PBS kills the job a few
# seconds after its own SIGTERM anyway (its kill_delay).
STREAM_VLLM_SHUTDOWN_GRACE_S="${STREAM_VLLM_SHUTDOWN_GRACE_S:-30}"
# CHANGE: where the weights are. Offline by default: download the weights once in advance,
# because compute nodes often have no internet access. Set HF_HUB_OFFLINE=0 to allow downloads
# (gated models then also need HF_TOKEN).
export HF_HOME="${HF_HOME:-/shared/models/hf}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"

# ---- Helpers ----------------------------------------------------------------------------------
log() { printf '%s stream-vllm: %s\n' "$(date '+%Y-%m-%dT%H:%M:%S')" "$*"; }
die() { log "ERROR: $*" >&2; exit 1; }

VLLM_PID=""
URL_WRITTEN=""
BASE_URL=""

stop_vllm() {
    local pid="$VLLM_PID" waited=0
    [[ -n "$pid" ]] || return 0
    VLLM_PID=""
    if kill -0 "$pid" 2>/dev/null; then
        log "stopping vLLM (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        while kill -0 "$pid" 2>/dev/null && (( waited < STREAM_VLLM_SHUTDOWN_GRACE_S )); do
            sleep 1
            waited=$((waited + 1))
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "vLLM still running after ${STREAM_VLLM_SHUTDOWN_GRACE_S}s; killing it"
            pkill -KILL -P "$pid" 2>/dev/null || true
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    trap '' TERM INT HUP  # a second signal must not cut the cleanup short
    stop_vllm || true
    # Remove the URL only if it is still ours: a newer job may have written its own since.
    if [[ -n "$URL_WRITTEN" && -f "$STREAM_VLLM_URL_FILE" ]]; then
        if [[ "$(cat "$STREAM_VLLM_URL_FILE" 2>/dev/null || true)" == "$BASE_URL" ]]; then
            rm -f "$STREAM_VLLM_URL_FILE" || true
            log "removed $STREAM_VLLM_URL_FILE"
        fi
    fi
}

on_signal() {
    log "received SIG$1"
    exit $((128 + $2))  # the EXIT trap stops vLLM and removes the URL file
}

trap cleanup EXIT
trap 'on_signal TERM 15' TERM
trap 'on_signal INT 2' INT
trap 'on_signal HUP 1' HUP

count_gpus() {
    local ids
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" && "${CUDA_VISIBLE_DEVICES}" != "NoDevFiles" ]]; then
        IFS=',' read -r -a ids <<< "$CUDA_VISIBLE_DEVICES"
        echo "${#ids[@]}"
    elif [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

# ---- Where we run -----------------------------------------------------------------------------
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    log "Slurm job $SLURM_JOB_ID on $(hostname)"
elif [[ -n "${PBS_JOBID:-}" ]]; then
    log "PBS job $PBS_JOBID on $(hostname)"
else
    log "no batch scheduler detected; running by hand on $(hostname)"
fi

# ---- Environment ------------------------------------------------------------------------------
if [[ -n "$STREAM_VLLM_VENV" ]]; then
    [[ -f "$STREAM_VLLM_VENV/bin/activate" ]] || die "no virtualenv at $STREAM_VLLM_VENV"
    # shellcheck disable=SC1091
    source "$STREAM_VLLM_VENV/bin/activate"
fi
command -v curl >/dev/null 2>&1 || die "curl is needed for the health check"

# ---- The API key: from the file into the environment, never onto a command line ---------------
[[ -r "$STREAM_VLLM_API_KEY_FILE" ]] || die "cannot read the key file $STREAM_VLLM_API_KEY_FILE"
mode="$(stat -c '%a' "$STREAM_VLLM_API_KEY_FILE" 2>/dev/null || true)"
if [[ -n "$mode" && "${mode: -2}" != "00" ]]; then
    log "WARNING: $STREAM_VLLM_API_KEY_FILE is readable by others (mode $mode); chmod 600 it"
fi
VLLM_API_KEY=""
IFS= read -r VLLM_API_KEY < "$STREAM_VLLM_API_KEY_FILE" || true
VLLM_API_KEY="${VLLM_API_KEY//[[:space:]]/}"
[[ -n "$VLLM_API_KEY" ]] || die "the key file $STREAM_VLLM_API_KEY_FILE is empty"
export VLLM_API_KEY

# ---- Tensor parallelism from the GPUs ---------------------------------------------------------
if [[ -n "$STREAM_VLLM_TP_SIZE" ]]; then
    tp="$STREAM_VLLM_TP_SIZE"
else
    gpus="$(count_gpus)"
    [[ "$gpus" =~ ^[0-9]+$ ]] || gpus=0
    (( gpus > 0 )) || die "no GPU found (CUDA_VISIBLE_DEVICES, SLURM_GPUS_ON_NODE, nvidia-smi)"
    tp=1
    while (( tp * 2 <= gpus )); do tp=$((tp * 2)); done
    if (( tp != gpus )); then
        log "WARNING: $gpus GPUs; using $tp for tensor parallelism (set STREAM_VLLM_TP_SIZE)"
    fi
fi

# ---- Start vLLM -------------------------------------------------------------------------------
args=(
    --host "$STREAM_VLLM_HOST"
    --port "$STREAM_VLLM_PORT"
    --tensor-parallel-size "$tp"
    --max-num-seqs "$STREAM_VLLM_MAX_NUM_SEQS"
    --gpu-memory-utilization "$STREAM_VLLM_GPU_MEMORY_UTILIZATION"
)
if [[ -n "$STREAM_VLLM_SERVED_MODEL_NAME" ]]; then
    args+=(--served-model-name "$STREAM_VLLM_SERVED_MODEL_NAME")
fi
if [[ -n "$STREAM_VLLM_MAX_MODEL_LEN" ]]; then
    args+=(--max-model-len "$STREAM_VLLM_MAX_MODEL_LEN")
fi
if [[ -n "$STREAM_VLLM_EXTRA_ARGS" ]]; then
    read -r -a extra <<< "$STREAM_VLLM_EXTRA_ARGS"
    args+=("${extra[@]}")
fi
if command -v vllm >/dev/null 2>&1; then
    cmd=(vllm serve "$STREAM_VLLM_MODEL")
else
    cmd=(python -m vllm.entrypoints.openai.api_server --model "$STREAM_VLLM_MODEL")
fi

served="${STREAM_VLLM_SERVED_MODEL_NAME:-$STREAM_VLLM_MODEL}"
log "starting vLLM: model $STREAM_VLLM_MODEL as '$served'," \
    "tensor parallel $tp, port $STREAM_VLLM_PORT"
"${cmd[@]}" "${args[@]}" &
VLLM_PID=$!

# ---- Wait until it serves ---------------------------------------------------------------------
case "$STREAM_VLLM_HOST" in
    0.0.0.0 | "" | "::") check_host="127.0.0.1" ;;
    *) check_host="$STREAM_VLLM_HOST" ;;
esac
local_url="http://${check_host}:${STREAM_VLLM_PORT}"
deadline=$((SECONDS + STREAM_VLLM_HEALTH_TIMEOUT_S))
until curl -fsS -o /dev/null --max-time 5 "$local_url/health" 2>/dev/null; do
    if ! kill -0 "$VLLM_PID" 2>/dev/null; then
        rc=0
        wait "$VLLM_PID" || rc=$?
        VLLM_PID=""
        die "vLLM exited with status $rc before it answered /health; see the log above"
    fi
    if (( SECONDS >= deadline )); then
        die "vLLM did not answer /health within ${STREAM_VLLM_HEALTH_TIMEOUT_S}s"
    fi
    sleep 2
done
log "vLLM answers /health after ${SECONDS}s"

# The key goes to curl through its standard input (printf is a shell builtin), not its arguments.
if ! models="$(printf 'header = "Authorization: Bearer %s"\n' "$VLLM_API_KEY" |
        curl -fsS --max-time 10 -K - "$local_url/v1/models")"; then
    die "vLLM did not accept the API key on /v1/models"
fi
if [[ "$models" != *"\"$served\""* ]]; then
    log "WARNING: /v1/models does not list '$served': $models"
fi

# ---- Publish the base URL ---------------------------------------------------------------------
advertise="${STREAM_VLLM_ADVERTISE_HOST:-$(hostname -f 2>/dev/null || hostname)}"
BASE_URL="http://${advertise}:${STREAM_VLLM_PORT}/v1"
mkdir -p "$(dirname "$STREAM_VLLM_URL_FILE")"
tmp="${STREAM_VLLM_URL_FILE}.tmp.$$"
printf '%s\n' "$BASE_URL" > "$tmp"
mv -f "$tmp" "$STREAM_VLLM_URL_FILE"
URL_WRITTEN=1
log "ready: base_url $BASE_URL (written to $STREAM_VLLM_URL_FILE), model '$served'"

# ---- Serve until vLLM exits or the job is stopped ---------------------------------------------
rc=0
wait "$VLLM_PID" || rc=$?
VLLM_PID=""
log "vLLM exited by itself with status $rc"
exit "$rc"
