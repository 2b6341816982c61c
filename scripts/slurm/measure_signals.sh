#!/bin/bash
# Re-measure the tables in SIGNALS.md where sbatch and srun work (about 5 minutes, 2 tasks at a time):
#
#   bash scripts/slurm/measure_signals.sh .venv/bin/python     # a python with distml and mpi4py
#
# 1: each signal sent to mpirun and to srun, which run signal_probe.py on 2 ranks.
# 2: scancel on a batch job whose script `exec`s the launcher, or traps TERM/USR1/USR2 and
#    forwards USR1 (the design of sync.sbatch and its siblings).
set -u
PY=${1:-python3}
PROBE=$(cd "$(dirname "$0")" && pwd)/signal_probe.py
MPIRUN=$(dirname "$(command -v "$PY")")/mpirun
[ -x "$MPIRUN" ] || MPIRUN=mpirun
export PY PROBE MPIRUN PMIX_MCA_psec=native OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
PROBE_LOG=$(mktemp) && export PROBE_LOG

ready() { for _ in $(seq 300); do [ "$(grep -c ready "$PROBE_LOG")" -ge 2 ] && return; sleep 0.1; done; }
got() { grep -oE "rank [0-9] got SIG[A-Z0-9]+" "$PROBE_LOG" | sed 's/rank \(.\) got SIG/\1:/' | sort | tr '\n' ' '; }
finished() { echo "$(grep -c finished "$PROBE_LOG")/2"; }
lived() {  # seconds from the first signal to the last sign of life (killed ranks stop early)
    awk '/ got /{if (!first) first=$(NF-1)} / alive /{last=$(NF-1)} END{if (first) printf "%.1f s", last-first}' "$PROBE_LOG"
}

echo "| launcher | signal to it | ranks got | ranks lived on | ranks finished | launcher exit |"
echo "|---|---|---|---|---|---|"
for launcher in mpirun srun; do
    for sig in TERM USR1 USR2 INT HUP; do
        : > "$PROBE_LOG"
        if [ "$launcher" = mpirun ]; then "$MPIRUN" -n 2 "$PY" "$PROBE" 6 > /dev/null 2>&1 &
        else srun --mpi=pmix -n 2 "$PY" "$PROBE" 6 > /dev/null 2>&1 &
        fi
        pid=$!; ready; kill -"$sig" "$pid"; wait "$pid"; rc=$?; sleep 0.5
        echo "| $launcher | $sig | $(got)| $(lived) | $(finished) | $rc |"
    done
done

JOB=$(mktemp)
cat > "$JOB" <<'SCRIPT'
#!/bin/bash
#SBATCH --ntasks=2 --cpus-per-task=1
if [ "$LAUNCHER" = srun ]; then cmd=(srun --mpi=pmix -n 2 "$PY" "$PROBE" 8)
else cmd=("$MPIRUN" -n 2 "$PY" "$PROBE" 8); fi
[ "$DESIGN" = exec ] && exec "${cmd[@]}"
child=""
trap '[ -n "$child" ] && kill -USR1 "$child"' TERM USR1 USR2
"${cmd[@]}" & child=$!
while kill -0 "$child" 2> /dev/null; do wait "$child"; done
SCRIPT
echo
echo "| script | launcher | scancel | ranks got | ranks lived on | ranks finished | job state |"
echo "|---|---|---|---|---|---|---|"
for design in exec trap; do
    for launcher in srun mpirun; do
        for how in "--signal=USR1 --batch" "--signal=USR1 --full" "--signal=USR1" "--signal=TERM --batch" ""; do
            : > "$PROBE_LOG"
            id=$(DESIGN=$design LAUNCHER=$launcher sbatch --parsable --output=/dev/null "$JOB")
            ready; scancel $how "$id"  # $how unquoted: no options or two
            for _ in $(seq 300); do
                state=$(scontrol show job "$id" | grep -oE "JobState=[A-Z_]+" | cut -d= -f2)
                case "$state" in COMPLETED|FAILED|CANCELLED|TIMEOUT) break ;; esac; sleep 0.2
            done
            echo "| $design | $launcher | ${how:-(none)} | $(got)| $(lived) | $(finished) | $state |"
        done
    done
done
rm -f "$JOB" "$PROBE_LOG"
