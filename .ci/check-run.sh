#!/usr/bin/env bash
# Checks a training run's result, not only its exit status. Sourced by the CI scripts.
#
#   summary_metric FILE          the validation metric of the summary line hylo-train printed
#   summary_loss FILE            its validation loss
#   check_summary FILE MIN       finite validation loss and a metric above MIN (chance)
#   check_metrics DIR MIN [train] the same on the last row of DIR/metrics.csv, and a finite
#                                training loss; with `train`, the training metric instead of the
#                                validation one (a BatchNorm model after a few steps is judged in
#                                evaluation mode by running statistics that have barely moved)
#   check_close A B TOL          |A - B| <= TOL

summary_metric() {
    sed -n 's/.*val \(acc\|dice\) \([0-9.eE+-]*\);.*/\2/p' "$1" | tail -n 1
}

summary_loss() {
    sed -n 's/.*val loss \([0-9.eE+-]*\|NaN\|inf\),.*/\1/p' "$1" | tail -n 1
}

finite() {
    [[ "$1" =~ ^-?[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]+)?$ ]]
}

above() {
    awk -v a="$1" -v b="$2" 'BEGIN { exit !(a + 0 > b + 0) }'
}

check_summary() {
    local metric loss
    metric=$(summary_metric "$1")
    loss=$(summary_loss "$1")
    if ! finite "$loss" || ! finite "$metric" || ! above "$metric" "$2"; then
        echo "$1: validation loss '$loss', metric '$metric' (expected finite, metric > $2)" >&2
        return 1
    fi
}

check_metrics() {
    local row loss metric
    row=$(tail -n 1 "$1/metrics.csv")
    loss=$(echo "$row" | cut -d, -f4)
    if [ "${3:-}" = train ]; then
        metric=$(echo "$row" | cut -d, -f5)
    else
        metric=$(echo "$row" | cut -d, -f7)
    fi
    if ! finite "$loss" || ! finite "$metric" || ! above "$metric" "$2"; then
        echo "$1/metrics.csv: last row '$row' (expected a finite training loss, ${3:-validation} metric > $2)" >&2
        return 1
    fi
}

check_close() {
    if ! awk -v a="$1" -v b="$2" -v t="$3" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(d <= t) }'; then
        echo "$1 and $2 differ by more than $3" >&2
        return 1
    fi
}
