#!/usr/bin/env bash
# Runs one command on every worker of a Cloud TPU VM (a single host or a pod slice) at once.
#
#   launch/tpu_run.sh [--dry-run] --tpu NAME --zone ZONE [--project P]
#       [--create TYPE --version V] [--repo URL --git-ref REF] [--env K=V ...]
#       [--log-dir DIR] [--num-workers N] [--remote-dir DIR] [--venv DIR] [--python PY]
#       [--skip-copy] [--skip-install] -- COMMAND ARGS...
#
# Steps (each a gcloud command; --dry-run prints them, shell-quoted, and runs none):
#   1. with --create: create the TPU VM;
#   2. ask gcloud how many workers (hosts) it has, unless --num-workers says;
#   3. put the code on every worker, in --remote-dir under the remote home (replaced each run):
#      by default the local working tree (tracked and untracked files git does not ignore, so
#      uncommitted edits travel too), packed here and copied with scp; with --repo/--git-ref,
#      every worker clones URL and checks out REF;
#   4. install on every worker, into a virtualenv (--venv, kept between runs): requirements.txt,
#      then the TPU build of the jax version pinned there ("jax[tpu]==X"), then this package;
#   5. start COMMAND on all workers together, one ssh per worker (JAX on a pod slice needs every
#      host to run the program; jax.distributed finds the others by itself), with the --env
#      variables exported; each worker's output goes to LOG_DIR/worker-I.log (worker 0's is
#      also shown here); exits non-zero, naming the workers, when any fails.
#
# COMMAND runs in --remote-dir with the virtualenv active. Its arguments reach it unchanged:
# the remote command line is built with every word quoted, so spaces, quotes, `$` and
# backslashes are not re-interpreted by the remote shell.
set -euo pipefail

readonly PROG=tpu_run
readonly TPU_VM=(compute tpus tpu-vm)
readonly REMOTE_ARCHIVE=tpu_run_code.tar.gz  # in the remote home, deleted once unpacked
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
skip_copy=0 skip_install=0 have_command=0
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
      --num-workers | --remote-dir | --venv | --python)
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
      esac
      shift ;;
    *) die_usage "unknown argument '$1' (the command goes after '--')" ;;
  esac
  shift
done

((have_command)) || die_usage "missing '--' before the command to run"
(($#)) || die_usage "no command after '--'"
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

# Flags every gcloud tpu-vm call takes: the zone, and the project when given.
where=("--zone=$zone")
[[ -z $project ]] || where+=("--project=$project")

if [[ -z $log_dir ]]; then
  log_dir="$REPO_ROOT/runs/tpu_logs/$tpu-$(date +%Y%m%d-%H%M%S)"
fi

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
  sudo apt-get update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$python" "$python-venv"
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

# The command each worker runs: activate the virtualenv, go to the code, export the
# variables, run COMMAND. Every value is quoted, so the remote shell gives COMMAND exactly
# the argv given here.
run_line="cd && . $(quote "$venv")/bin/activate && cd $(quote "$remote_dir")"
if ((${#envs[@]})); then
  run_line+=" && export"
  for kv in "${envs[@]}"; do
    run_line+=" ${kv%%=*}=$(quote "${kv#*=}")"
  done
fi
run_line+=" && $(quote_words "${command_argv[@]}")"

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
  gcloud "${TPU_VM[@]}" ssh "$tpu" "${where[@]}" "--worker=$1" "--command=$run_line"
}

if ((dry_run)); then
  workers_text=${num_workers:-N}
  echo "# on all $workers_text workers at once, each in the background:"
  if [[ -n $num_workers ]]; then
    for ((i = 0; i < num_workers; i++)); do
      printf '%s >%s 2>&1 &\n' "$(quote_words gcloud "${TPU_VM[@]}" ssh "$tpu" "${where[@]}" \
        "--worker=$i" "--command=$run_line")" "$(quote "$log_dir/worker-$i.log")"
    done
  else  # the count is what the describe above prints
    printf '%s >%s 2>&1 &\n' "$(quote_words gcloud "${TPU_VM[@]}" ssh "$tpu" "${where[@]}" \
      "--worker=I" "--command=$run_line")" "$(quote "$log_dir/worker-I.log")"
    echo "# (one line per worker I = 0 .. N-1, N from the describe command above)"
  fi
  echo "wait"
  exit 0
fi

mkdir -p "$log_dir"
say "running on $num_workers worker(s) of $tpu: $(quote_words "${command_argv[@]}")"
say "logs: $log_dir/worker-I.log (worker 0 shown here)"
# Job control gives each worker's job its own process group, so that Ctrl-C (which then reaches
# only this script) can stop a whole job, gcloud and the ssh it started; without it background
# jobs ignore SIGINT. Their stdin is /dev/null: a background job reading the terminal would stop.
set -m
pids=()
stop_workers() {
  say "interrupted; closing the ssh sessions (see launch/README.md to stop the remote processes)"
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
# makes the ssh's rather than tee's).
failed=()
for ((i = 0; i < num_workers; i++)); do
  if wait "${pids[i]}"; then
    status=0
  else
    status=$?
  fi
  if ((status != 0)); then
    failed+=("$i")
    say "worker $i failed (exit $status); its log: $log_dir/worker-$i.log"
  fi
done

if ((${#failed[@]})); then
  say "FAILED on worker(s) ${failed[*]} of $num_workers; logs in $log_dir"
  exit 1
fi
say "all $num_workers worker(s) succeeded; logs in $log_dir"
