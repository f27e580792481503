# The part runner of the GPU job scripts (gpu_train_job.sh, gpu_decode_job.sh), sourced by them. The script
# sets `wanted` (" NAME NAME "), `deadline` (seconds for the whole job), `logs` (a folder) and defines
# `part_results LOG`, which prints the lines of a part's log worth showing.
#
# part NAME SECONDS COMMAND...: runs COMMAND if NAME is wanted, under its own time limit cut to what is left
# of the deadline, with its output in $logs/NAME.log; prints its results prefixed with [NAME], its exit status
# and time, and on failure the end of its log.
part() {
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    [[ $wanted == *" $name "* ]] || return 0
    ((limit > deadline - SECONDS)) && limit=$((deadline - SECONDS))
    if ((limit < 15)); then echo "[$name] skipped: the job's $deadline s are spent"; return 0; fi
    timeout --kill-after=10 "$limit" "$@" >"$logs/$name.log" 2>&1
    rc=$?
    part_results "$logs/$name.log" | sed "s/^/[$name] /"
    echo "[$name] exit $rc after $((SECONDS - start)) s$( ((rc == 124)) && echo " (its $limit s limit)")"
    ((rc == 0)) || grep -v '^{' "$logs/$name.log" | tail -n 6 | cut -c1-300 | sed "s/^/[$name]   /"
}
