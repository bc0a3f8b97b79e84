#!/usr/bin/env bash
# Runs one command on every worker of a Cloud TPU VM (a single host or a pod slice) at once.
#
#   launch/tpu_run.sh [--dry-run] --tpu NAME --zone ZONE [--project P]
#       [--create TYPE --version V] [--repo URL --git-ref REF] [--env K=V ...]
#       [--log-dir DIR] [--num-workers N] [--remote-dir DIR] [--venv DIR] [--python PY]
#       [--skip-copy] [--skip-install] -- COMMAND ARGS...
#   launch/tpu_run.sh --tpu NAME --zone ZONE [--project P] [--log-dir DIR] --attach JOB
#
# Steps (each a gcloud command; --dry-run prints them, shell-quoted, and runs none):
#   1. with --create: create the TPU VM;
#   2. ask gcloud how many workers (hosts) it has, unless --num-workers says, and stop here if
#      any worker still runs a job this script started (its code and chips are in use);
#   3. put the code on every worker, in --remote-dir under the remote home (replaced each run):
#      by default the local working tree (tracked and untracked files git does not ignore, so
#      uncommitted edits travel too), packed here and copied with scp; with --repo/--git-ref,
#      every worker clones URL and checks out REF;
#   4. install on every worker, into a virtualenv (--venv, kept between runs): requirements.txt,
#      then the TPU build of the jax version pinned there ("jax[tpu]==X"), then this package;
#   5. start COMMAND on all workers together, one ssh per worker (JAX on a pod slice needs every
#      host to run the program; jax.distributed finds the others by itself), with the --env
#      variables exported; each worker's output goes to LOG_DIR/worker-I.log (worker 0's is
#      also shown here); exits with the status of the first worker that fails, naming them.
#
# COMMAND runs in --remote-dir with the virtualenv active. Its arguments reach it unchanged:
# the remote command line is built with every word quoted, so spaces, quotes, `$` and
# backslashes are not re-interpreted by the remote shell.
#
# On each worker COMMAND runs detached from the ssh session, as job JOB (the name of LOG_DIR):
# its output goes to ~/tpu_run_logs/JOB/output.log there, and its pid and exit status to pid and
# exit_status beside it; the ssh only follows that log. So Ctrl-C or a lost connection stops
# the following, not the job: --attach JOB follows it again (from the start of its log) and
# exits with its status; the script prints the command that stops it. The start is tagged with
# this launch's id, so when gcloud retries the ssh after a dropped connection (it does, on
# ssh's 255) the retry follows the job it started instead of starting it again.
#
# A `--workdir` in COMMAND must outlive the code directory, which the next launch replaces:
# a relative one (inside it) is refused; use gs://BUCKET/PATH, which every host of a slice
# shares (a local path on several hosts gives each its own checkpoints).
set -euo pipefail

readonly PROG=tpu_run
readonly TPU_VM=(compute tpus tpu-vm)
readonly REMOTE_ARCHIVE=tpu_run_code.tar.gz  # in the remote home, deleted once unpacked
readonly REMOTE_JOBS=tpu_run_logs  # in the remote home: one folder per job, kept
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO_ROOT

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
  cat <<'EOF'

Options:
  --dry-run          print every command (shell-quoted), run none
  --tpu NAME         TPU VM name (required)
  --zone ZONE        its zone (required)
  --project P        Google Cloud project (default: gcloud's configured one)
  --create TYPE      create the TPU VM first, with this accelerator type (e.g. v5litepod-16)
  --version V        runtime version for --create (e.g. v2-alpha-tpuv5-lite)
  --repo URL         clone URL on the workers instead of copying the working tree ...
  --git-ref REF      ... and check out REF (branch, tag or commit); give both or neither
  --env K=V          export K=V for COMMAND (repeatable)
  --log-dir DIR      where worker-I.log go (default runs/tpu_logs/NAME-TIMESTAMP in the repo)
  --num-workers N    the worker count, instead of asking gcloud (describe)
  --remote-dir DIR   code directory on the workers, relative to the home (default mirasol3b)
  --venv DIR         virtualenv on the workers, relative to the home (default mirasol3b-venv)
  --python PY        interpreter for the virtualenv (default python3.11; apt-installed if absent)
  --skip-copy        use the code already in --remote-dir on the workers
  --skip-install     do not run pip on the workers (reuse --venv as it is)
  --attach JOB       follow job JOB, already started, instead (no steps 1-4, no COMMAND);
                     its logs go to runs/tpu_logs/JOB unless --log-dir says
EOF
}

die_usage() {  # usage errors exit 2, like getopt-style tools
  echo "$PROG: $*" >&2
  echo "$PROG: see '$0 --help'" >&2
  exit 2
}

die() {
  echo "$PROG: $*" >&2
  exit 1
}

say() {
  echo "$PROG: $*" >&2
}

# quote WORD: WORD as one POSIX shell word (bare when it is safe, else in single quotes, with
# each ' written as '\''). Used for the remote command line, which the remote login shell
# re-splits, and for --dry-run's output. Unlike printf %q it never emits bash-only $'...'.
quote() {
  local s=$1 q="'\\''"
  if [[ $s =~ ^[A-Za-z0-9_./:@%+,=-]+$ && ! $s =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; then
    printf '%s' "$s"  # no character the shell treats specially (and not an assignment)
  else
    printf "'%s'" "${s//\'/"$q"}"
  fi
}

# quote_words WORD...: the words quoted and joined by spaces: one command line.
quote_words() {
  local out="" w
  for w in "$@"; do
    out+="${out:+ }$(quote "$w")"
  done
  printf '%s' "$out"
}

# run CMD...: runs CMD, or with --dry-run prints it. Every gcloud call goes through here.
run() {
  if ((dry_run)); then
    quote_words "$@"
    echo
  else
    "$@"
  fi
}

# ---------------------------------------------------------------------------- arguments
dry_run=0 tpu="" zone="" project="" accel_type="" version="" repo="" git_ref=""
log_dir="" num_workers="" remote_dir=mirasol3b venv=mirasol3b-venv python=python3.11
skip_copy=0 skip_install=0 have_command=0 attach=""
envs=()

need_value() {  # OPTION REMAINING_ARG_COUNT [VALUE]; no value of ours starts with --
  if (($2 < 2)) || [[ $3 == --* ]]; then
    die_usage "$1 needs a value"
  fi
}

while (($#)); do
  case $1 in
    --) shift; have_command=1; break ;;
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;  # --opt=value as --opt value
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1 ;;
    --skip-copy) skip_copy=1 ;;
    --skip-install) skip_install=1 ;;
    --tpu | --zone | --project | --create | --version | --repo | --git-ref | --env | --log-dir | \
      --num-workers | --remote-dir | --venv | --python | --attach)
      need_value "$1" $# "${2-}"
      case $1 in
        --tpu) tpu=$2 ;;
        --zone) zone=$2 ;;
        --project) project=$2 ;;
        --create) accel_type=$2 ;;
        --version) version=$2 ;;
        --repo) repo=$2 ;;
        --git-ref) git_ref=$2 ;;
        --env) envs+=("$2") ;;
        --log-dir) log_dir=$2 ;;
        --num-workers) num_workers=$2 ;;
        --remote-dir) remote_dir=$2 ;;
        --venv) venv=$2 ;;
        --python) python=$2 ;;
        --attach) attach=$2 ;;
      esac
      shift ;;
    *) die_usage "unknown argument '$1' (the command goes after '--')" ;;
  esac
  shift
done

if [[ -n $attach ]]; then
  (($# == 0)) || die_usage "--attach follows a job already started: no command"
  if [[ -n $accel_type || -n $repo || ${#envs[@]} -gt 0 ]]; then
    die_usage "--attach takes none of --create, --repo, --env"
  fi
  [[ $attach =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]*$ ]] || die_usage "--attach wants a job name, got '$attach'"
  skip_copy=1 skip_install=1
else
  ((have_command)) || die_usage "missing '--' before the command to run"
  (($#)) || die_usage "no command after '--'"
fi
[[ -n $tpu ]] || die_usage "--tpu NAME is required"
[[ -n $zone ]] || die_usage "--zone ZONE is required"
if [[ -n $accel_type && -z $version ]]; then die_usage "--create needs --version (the TPU runtime)"; fi
if [[ -z $accel_type && -n $version ]]; then die_usage "--version is only used with --create"; fi
if [[ -n $repo && -z $git_ref ]] || [[ -z $repo && -n $git_ref ]]; then
  die_usage "--repo and --git-ref go together"
fi
if [[ -n $repo ]] && ((skip_copy)); then die_usage "--skip-copy and --repo contradict each other"; fi
if [[ -n $num_workers ]] && ! [[ $num_workers =~ ^[1-9][0-9]*$ ]]; then
  die_usage "--num-workers must be a positive integer, got '$num_workers'"
fi
# The code directory is deleted and recreated on every copy, so it must be a plain directory
# under the remote home, never the home itself or anything outside it.
if ! [[ $remote_dir =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$ ]]; then
  die_usage "--remote-dir must be a relative path under the remote home (got '$remote_dir')"
fi
for kv in "${envs[@]}"; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die_usage "--env wants NAME=VALUE, got '$kv'"
done
command_argv=("$@")

# A relative --workdir would live in the code directory on the workers, which the next launch
# deletes with the checkpoints in it.
for ((i = 0; i < ${#command_argv[@]}; i++)); do
  case ${command_argv[i]} in
    --workdir=*) workdir=${command_argv[i]#--workdir=} ;;
    --workdir) workdir=${command_argv[i + 1]-} ;;
    *) continue ;;
  esac
  if [[ $workdir != *://* && $workdir != /* ]]; then
    die_usage "--workdir '$workdir' in the command is relative: on the workers it would be inside" \
      "the code directory $remote_dir, which the next launch replaces (checkpoints included). Use gs://BUCKET/PATH" \
      "(every host of a slice must see the same directory; docs/pods.md, \"Before the first run\")"
  fi
done

# Flags every gcloud tpu-vm call takes: the zone, and the project when given.
where=("--zone=$zone")
[[ -z $project ]] || where+=("--project=$project")

if [[ -z $log_dir ]]; then
  log_dir="$REPO_ROOT/runs/tpu_logs/${attach:-$tpu-$(date +%Y%m%d-%H%M%S)}"
fi
# The job is named after the log folder, so that its local and remote logs are easy to pair
# and a dry run names the same job as the real run; made safe as one path component.
job=$attach
if [[ -z $job ]]; then
  job=${log_dir%/}
  job=${job##*/}
  job=${job//[^A-Za-z0-9_.-]/_}
  [[ $job =~ ^[A-Za-z0-9_] ]] || job=_$job
fi
job_dir=$REMOTE_JOBS/$job

# ---------------------------------------------------------------------------- remote scripts
# Run as `bash -c SCRIPT tpu_run ARGS` so values arrive as positional parameters, not text.

# $1 code dir, $2 virtualenv, $3 python. Paths are relative to the remote home.
read -r -d '' INSTALL_SCRIPT <<'EOF' || true
set -euo pipefail
code_dir=$1 venv=$2 python=$3
cd
case $venv in /*) ;; *) venv=$HOME/$venv ;; esac
if ! command -v "$python" >/dev/null 2>&1; then
  # TPU VM images are Ubuntu 22.04 with python3.10; this package needs 3.11.
  echo "$(hostname): installing $python with apt"
  # Wait for the dpkg lock: on a new VM unattended-upgrades holds it for minutes after boot.
  sudo apt-get -o DPkg::Lock::Timeout=600 update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    "$python" "$python-venv"
fi
if [ ! -x "$venv/bin/python" ]; then "$python" -m venv "$venv"; fi
cd "$code_dir"
# The TPU build of exactly the jax that requirements.txt pins (jaxlib is pinned beside it).
jax_version=$(sed -n "s/^jax==\([^[:space:];#]*\).*/\1/p" requirements.txt)
if [ -z "$jax_version" ]; then echo "no jax==VERSION line in requirements.txt" >&2; exit 1; fi
echo "$(hostname): installing requirements.txt, jax[tpu]==$jax_version and the package"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -r requirements.txt
"$venv/bin/python" -m pip install --quiet "jax[tpu]==$jax_version"
"$venv/bin/python" -m pip install --quiet --no-deps -e .
EOF
readonly INSTALL_SCRIPT

# $1 archive, $2 code dir.
read -r -d '' UNPACK_SCRIPT <<'EOF' || true
set -euo pipefail
cd
rm -rf "$2"
mkdir -p "$2"
tar -xzf "$1" -C "$2"
rm -f "$1"
EOF
readonly UNPACK_SCRIPT

# $1 repo URL, $2 ref, $3 code dir.
read -r -d '' CLONE_SCRIPT <<'EOF' || true
set -euo pipefail
cd
rm -rf "$3"
git clone --quiet "$1" "$3"
git -C "$3" checkout --quiet "$2"
echo "$(hostname): $(git -C "$3" rev-parse HEAD)"
EOF
readonly CLONE_SCRIPT

# Shared by the scripts below. job_running DIR: DIR's job (an absolute job folder) is alive: its
# pid is alive and is that job's shell (the pid file outlives a reboot; its pid may be reused).
read -r -d '' JOB_LIB <<'EOF' || true
job_running() {
  [ -s "$1/pid" ] && [ ! -e "$1/exit_status" ] || return 1
  pid=$(cat "$1/pid")
  kill -0 "$pid" 2>/dev/null || return 1
  [ -r "/proc/$pid/cmdline" ] || return 0
  tr '\0' '\n' <"/proc/$pid/cmdline" | grep -qxF -- "$1"
}
EOF
readonly JOB_LIB

# Lists the jobs still running on this worker, one "tpu_run-running JOB PID HOST" line each.
read -r -d '' CHECK_SCRIPT <<EOF || true
set -eu
$JOB_LIB
for dir in "\$HOME/$REMOTE_JOBS"/*/; do
  dir=\${dir%/}
  if job_running "\$dir"; then echo "tpu_run-running \${dir##*/} \$(cat "\$dir/pid") \$(hostname)"; fi
done
EOF
readonly CHECK_SCRIPT

# $1 job folder (relative to the home); then either $2 this launch's id and $3 the command line
# to start there as a new job, or nothing, to follow the job already there. Prints the job's
# output as it comes (from the start of its log) and exits with the job's status.
read -r -d '' JOB_SCRIPT_BODY <<'EOF' || true
job=$HOME/$1
if [ $# -ge 3 ]; then
  if [ -s "$job/launch_id" ] && [ "$(cat "$job/launch_id")" = "$2" ]; then
    # gcloud retried this ssh after a dropped connection: the job is this launch's own.
    echo "$(hostname): job ~/$1 was started by this launch already; following it (its log from the start)" >&2
  else
    if job_running "$job"; then
      echo "$(hostname): job ~/$1 is still running (pid $(cat "$job/pid")); stop it first" >&2
      exit 1
    fi
    mkdir -p "$job"
    rm -f "$job/output.log" "$job/pid" "$job/exit_status"
    echo "$2" >"$job/launch_id"
    # A session of its own, holding none of the pipes of the ssh: when the connection goes
    # (laptop asleep, Wi-Fi, Ctrl-C) the job gets no hangup and its prints no broken pipe. Its
    # shell traps TERM so that a stop still records the status.
    setsid nohup bash -c 'echo $$ >"$1/pid"; trap : TERM; eval "$2"; echo $? >"$1/exit_status.tmp"
mv "$1/exit_status.tmp" "$1/exit_status"' tpu_run "$job" "$3" >"$job/output.log" 2>&1 </dev/null &
  fi
  tries=0
  until [ -s "$job/pid" ]; do
    tries=$((tries + 1))
    if [ "$tries" -gt 300 ]; then echo "$(hostname): job ~/$1 did not start" >&2; exit 1; fi
    sleep 0.1
  done
elif [ ! -s "$job/pid" ]; then
  echo "$(hostname): no job ~/$1 here" >&2
  exit 1
fi
tail -n +1 -F --pid="$(cat "$job/pid")" "$job/output.log"
if [ -s "$job/exit_status" ]; then exit "$(cat "$job/exit_status")"; fi
echo "$(hostname): job ~/$1 ended without an exit status (killed?)" >&2
exit 1
EOF
readonly JOB_SCRIPT="set -euo pipefail"$'\n'"$JOB_LIB"$'\n'"$JOB_SCRIPT_BODY"

# The command line each worker's job runs: activate the virtualenv, go to the code, export
# the variables, run COMMAND. Every value is quoted, so the remote shell gives COMMAND exactly
# the argv given here.
job_args=("$job_dir")
if [[ -z $attach ]]; then
  # Unique per launch: a retried ssh (same id) follows the job instead of starting it again.
  job_args+=("$(date +%Y%m%d-%H%M%S)-$$-$RANDOM")
  run_line="cd && . $(quote "$venv")/bin/activate && cd $(quote "$remote_dir")"
  if ((${#envs[@]})); then
    run_line+=" && export"
    for kv in "${envs[@]}"; do
      run_line+=" ${kv%%=*}=$(quote "${kv#*=}")"
    done
  fi
  run_line+=" && $(quote_words "${command_argv[@]}")"
  job_args+=("$run_line")
fi
remote_command=$(quote_words bash -c "$JOB_SCRIPT" "$PROG" "${job_args[@]}")
# The command lines that follow job NAME again and that stop it, for the user to paste.
attach_line() { quote_words "$0" --tpu "$tpu" "${where[@]}" --attach "$1"; }
stop_line() {
  quote_words gcloud "${TPU_VM[@]}" ssh "$tpu" "${where[@]}" --worker=all \
    "--command=[ -e $REMOTE_JOBS/$1/exit_status ] || kill -TERM -- -\$(cat $REMOTE_JOBS/$1/pid)"
}
attach_command=$(attach_line "$job")
stop_command=$(stop_line "$job")

# ---------------------------------------------------------------------------- 1. create
if [[ -n $accel_type ]]; then
  say "creating $tpu ($accel_type, $version) in $zone"
  run gcloud "${TPU_VM[@]}" create "$tpu" "${where[@]}" \
    "--accelerator-type=$accel_type" "--version=$version"
fi

# ---------------------------------------------------------------------------- 2. workers
if [[ -z $num_workers ]]; then
  # One network endpoint per worker VM (host) of the slice.
  describe=(gcloud "${TPU_VM[@]}" describe "$tpu" "${where[@]}" "--format=value(networkEndpoints.len())")
  if ((dry_run)); then
    run "${describe[@]}"
  else
    num_workers=$("${describe[@]}")
    [[ $num_workers =~ ^[1-9][0-9]*$ ]] ||
      die "could not read the worker count of $tpu (describe printed '$num_workers'); pass --num-workers"
  fi
fi

# A job this script started that still runs holds the chips and runs from the code and the
# virtualenv that steps 3 and 4 would replace under it: stop before touching anything.
if [[ -z $attach ]]; then
  check=(gcloud "${TPU_VM[@]}" ssh "$tpu" "${where[@]}" --worker=all
    "--command=$(quote_words bash -c "$CHECK_SCRIPT" "$PROG")")
  if ((dry_run)); then
    echo "# stop if any of these lines says tpu_run-running (a job still runs on a worker):"
    run "${check[@]}"
  else
    say "asking the workers whether a job of this script still runs there"
    if ! check_output=$("${check[@]}"); then
      die "could not ask the workers of $tpu whether a job still runs (the ssh failed; see above)"
    fi
    # Not anchored: gcloud may prefix a worker's lines.
    running=$(grep -o 'tpu_run-running .*' <<<"$check_output" || true)
    if [[ -n $running ]]; then
      while read -r _ name pid host; do
        say "job $name is still running on $host (pid $pid)"
      done <<<"$running"
      name=$(head -n 1 <<<"$running" | cut -d ' ' -f 2)
      say "a new launch would replace its code and compete for the chips. Follow it:"
      say "  $(attach_line "$name")"
      say "or stop it, then launch again:"
      say "  $(stop_line "$name")"
      exit 1
    fi
  fi
fi

# ---------------------------------------------------------------------------- 3. code
if [[ -n $repo ]]; then
  say "cloning $repo at $git_ref into ~/$remote_dir on every worker"
  run gcloud "${TPU_VM[@]}" ssh "$tpu" "${where[@]}" --worker=all \
    "--command=$(quote_words bash -c "$CLONE_SCRIPT" "$PROG" "$repo" "$git_ref" "$remote_dir")"
elif ((!skip_copy)); then
  say "copying the working tree of $REPO_ROOT to ~/$remote_dir on every worker"
  if ((dry_run)); then
    archive=/tmp/tpu_run.XXXXXXXXXX/$REMOTE_ARCHIVE  # really a fresh `mktemp -d`
    echo "# pack the files 'git ls-files --cached --others --exclude-standard' lists (those still present):"
    quote_words git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard
    echo " | tar -czf $archive -C $(quote "$REPO_ROOT") --null -T -"
  else
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    archive=$tmp/$REMOTE_ARCHIVE
    # Tracked and untracked-but-not-ignored files (so .venv, runs/ and caches stay home), as
    # they are now; a tracked file deleted in the working tree is left out, not an error.
    git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do
        if [[ -e $REPO_ROOT/$f || -L $REPO_ROOT/$f ]]; then printf '%s\0' "$f"; fi
      done |
      tar -czf "$archive" -C "$REPO_ROOT" --null -T -
  fi
  run gcloud "${TPU_VM[@]}" scp "$archive" "$tpu:$REMOTE_ARCHIVE" "${where[@]}" --worker=all
  run gcloud "${TPU_VM[@]}" ssh "$tpu" "${where[@]}" --worker=all \
    "--command=$(quote_words bash -c "$UNPACK_SCRIPT" "$PROG" "$REMOTE_ARCHIVE" "$remote_dir")"
fi

# ---------------------------------------------------------------------------- 4. install
if ((!skip_install)); then
  say "installing into ~/$venv on every worker"
  run gcloud "${TPU_VM[@]}" ssh "$tpu" "${where[@]}" --worker=all \
    "--command=$(quote_words bash -c "$INSTALL_SCRIPT" "$PROG" "$remote_dir" "$venv" "$python")"
fi

# ---------------------------------------------------------------------------- 5. run
# One ssh per worker rather than one --worker=all: each worker then has its own log file and
# its own exit status, so a failure says which worker it was.
ssh_worker() {  # WORKER
  gcloud "${TPU_VM[@]}" ssh "$tpu" "${where[@]}" "--worker=$1" "--command=$remote_command"
}

if ((dry_run)); then
  workers_text=${num_workers:-N}
  echo "# on all $workers_text workers at once, each in the background:"
  if [[ -n $num_workers ]]; then
    for ((i = 0; i < num_workers; i++)); do
      printf '%s >%s 2>&1 &\n' "$(quote_words gcloud "${TPU_VM[@]}" ssh "$tpu" "${where[@]}" \
        "--worker=$i" "--command=$remote_command")" "$(quote "$log_dir/worker-$i.log")"
    done
  else  # the count is what the describe above prints
    printf '%s >%s 2>&1 &\n' "$(quote_words gcloud "${TPU_VM[@]}" ssh "$tpu" "${where[@]}" \
      "--worker=I" "--command=$remote_command")" "$(quote "$log_dir/worker-I.log")"
    echo "# (one line per worker I = 0 .. N-1, N from the describe command above)"
  fi
  echo "wait"
  exit 0
fi

mkdir -p "$log_dir"
if [[ -n $attach ]]; then
  say "following job $job on $num_workers worker(s) of $tpu"
else
  say "running on $num_workers worker(s) of $tpu, as job $job: $(quote_words "${command_argv[@]}")"
fi
say "logs: $log_dir/worker-I.log (worker 0 shown here); on each worker ~/$job_dir/output.log"
say "the job does not stop with this script (Ctrl-C, lost connection); follow it again with:"
say "  $attach_command"
say "stop it with:"
say "  $stop_command"
# Job control gives each worker's job its own process group, so that Ctrl-C (which then reaches
# only this script) can stop a whole job, gcloud and the ssh it started; without it background
# jobs ignore SIGINT. Their stdin is /dev/null: a background job reading the terminal would stop.
set -m
pids=()
stop_workers() {
  say "interrupted; the job goes on on the workers (docs/pods.md, \"Later runs, logs, stopping\")."
  say "follow it again: $attach_command"
  say "stop it: $stop_command"
  disown -a  # out of the job table first: bash would print a "Terminated" line for each
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  exit 130
}
trap stop_workers INT TERM
for ((i = 0; i < num_workers; i++)); do
  if ((i == 0)); then
    { ssh_worker "$i" 2>&1 | tee "$log_dir/worker-$i.log"; } </dev/null &
  else
    ssh_worker "$i" </dev/null >"$log_dir/worker-$i.log" 2>&1 &
  fi
  pids+=($!)
done

# `wait PID` gives that job's status (for worker 0 the { ... | tee } group's, which pipefail
# makes the ssh's rather than tee's): the remote job's, or ssh's 255.
failed=() first_status=0
for ((i = 0; i < num_workers; i++)); do
  if wait "${pids[i]}"; then
    status=0
  else
    status=$?
  fi
  if ((status != 0)); then
    failed+=("$i")
    ((first_status)) || first_status=$status
    say "worker $i failed (exit $status); its log: $log_dir/worker-$i.log"
  fi
done

if ((${#failed[@]})); then
  say "FAILED on worker(s) ${failed[*]} of $num_workers; logs in $log_dir"
  exit "$first_status"
fi
say "all $num_workers worker(s) succeeded; logs in $log_dir"
