# bash completion for rrengine(1)                                   -*- shell-script -*-
# shellcheck shell=bash
#
# Completes the engine's options, the plans (plans/*.lua here and beside the installed library),
# each plan's options (read from the plan's own --help, so they never go stale), service names
# for --service (read from the services file on the line, else the one rrengine itself would
# use: ./services.lua, else /etc/rrengine/services.lua or, with --user, the user's own), and files or directories where an option wants one. Every rrengine it runs is quiet
# and bounded in time: a broken services file completes nothing, silently.
#
# Installed as $PREFIX/share/bash-completion/completions/rrengine; zsh uses it through
# bashcompinit (completion/_rrengine), so it sticks to what both shells understand.

declare -gA _rrengine_opt_cache 2>/dev/null || typeset -gA _rrengine_opt_cache
declare -gA _rrengine_root_cache 2>/dev/null || typeset -gA _rrengine_root_cache

# Runs rrengine with stderr dropped and a time limit (a services file stuck in a loop).
_rrengine_run() {
    if command -v timeout >/dev/null 2>&1; then
        timeout 5 "$@" 2>/dev/null </dev/null
    else
        "$@" 2>/dev/null </dev/null
    fi
}

# Where this rrengine finds its library and plans.
_rrengine_root() {
    local cmd=$1
    if [[ -z ${_rrengine_root_cache[$cmd]:-} ]]; then
        _rrengine_root_cache[$cmd]=$(_rrengine_run "$cmd" -e 'io.write(debug.getregistry()["rr.root"] or "")')
    fi
    printf '%s' "${_rrengine_root_cache[$cmd]}"
}

# The plans by the name rrengine accepts from any directory: plans/NAME.lua.
_rrengine_plans() {
    local root f
    root=$(_rrengine_root "$1")
    for f in ./plans/*.lua ${root:+"$root"/plans/*.lua}; do
        [[ -f $f ]] && printf 'plans/%s\n' "${f##*/}"
    done | sort -u
}

# A plan's options from its --help, one a line: "--name" or "--name META" (and "-x" forms).
_rrengine_plan_options() {
    local cmd=$1 plan=$2 key="$1|$2"
    if [[ -z ${_rrengine_opt_cache[$key]+set} ]]; then
        _rrengine_opt_cache[$key]=$(_rrengine_run "$cmd" "$plan" --help | awk '
            /^Options:/ { on = 1; next }
            /^$/ || /^[^ ]/ { on = 0 }
            on && /^  -/ {
                left = substr($0, 3)
                sub(/   *[^ ].*$/, "", left)    # drop the help text (two or more spaces on)
                meta = ""
                if (match(left, / [A-Z][A-Z_]*$/)) { meta = substr(left, RSTART); left = substr(left, 1, RSTART - 1) }
                n = split(left, names, /, /)
                for (i = 1; i <= n; i++) print names[i] meta
            }')
    fi
    printf '%s\n' "${_rrengine_opt_cache[$key]}"
}

# The service names of a services file (nothing when it cannot be loaded). No file named on the
# line: the one the plan would read, found by rrengine's own rule (rr.cli.find_services).
_rrengine_services() {
    local cmd=$1 file=$2 user=$3
    if [[ -z $file ]]; then
        file=$(RRENGINE_COMPLETE_USER=$user _rrengine_run "$cmd" -e '
            io.write(require("rr.cli").find_services(os.getenv("RRENGINE_COMPLETE_USER") == "1") or "")')
    fi
    [[ -r $file ]] || return 0
    RRENGINE_COMPLETE_SERVICES=$file _rrengine_run "$cmd" -e '
        local platform = require("rr.services").load(os.getenv("RRENGINE_COMPLETE_SERVICES"))
        for _, s in ipairs(platform and platform.services or {}) do print(s.name) end'
}

# COMPREPLY from a newline-separated list of candidates that start with $2; $3 goes in front.
_rrengine_reply() {
    local list=$1 cur=$2 prefix=${3:-} line
    local IFS=$'\n'
    for line in $list; do
        [[ -n $line && $line == "$cur"* ]] && COMPREPLY+=("$prefix$line")
    done
}

_rrengine_files() { # $1: what is typed; $2: "dirs" for directories only; $3: prefix
    local IFS=$'\n' f
    type compopt >/dev/null 2>&1 && compopt -o filenames 2>/dev/null
    if [[ ${2:-} == dirs ]]; then
        for f in $(compgen -d -- "$1"); do COMPREPLY+=("${3:-}$f"); done
    else
        for f in $(compgen -f -- "$1"); do COMPREPLY+=("${3:-}$f"); done
    fi
}

_rrengine() {
    COMPREPLY=()
    local cword=$COMP_CWORD
    local cur=${COMP_WORDS[cword]} prev=""
    ((cword > 0)) && prev=${COMP_WORDS[cword - 1]}
    local cmd=${COMP_WORDS[0]}
    cmd=${cmd/#\~/$HOME}
    [[ $cmd == */* ]] || cmd=$(command -v "$cmd" 2>/dev/null) || return 0
    [[ -x $cmd ]] || return 0

    # What is on the line before the word: the plan (the first word that is not an engine
    # option), whether the REPL was asked for, the services file.
    local i w plan="" repl=0 services="" user=0
    for ((i = 1; i < cword; i++)); do
        w=${COMP_WORDS[i]}
        if [[ $w == "=" ]]; then continue; fi
        [[ $w == --user ]] && user=1
        if [[ -z $plan ]]; then
            case $w in
                -e) ((i++)) ;;
                -i) repl=1 ;;
                --services) ((repl && i + 1 < cword)) && { services=${COMP_WORDS[i + 1]}; ((i++)); } ;;
                -*) ;;
                *) plan=$w ;;
            esac
        else
            case $w in
                --services)
                    if ((i + 1 < cword)) && [[ ${COMP_WORDS[i + 1]} == "=" ]]; then
                        ((i + 2 < cword)) && services=${COMP_WORDS[i + 2]}
                    elif ((i + 1 < cword)); then
                        services=${COMP_WORDS[i + 1]}
                    fi ;;
                --services=*) services=${w#--services=} ;;
            esac
        fi
    done
    if [[ -z $services ]]; then
        ((repl)) && [[ -n ${RRENGINE_SERVICES:-} ]] && services=$RRENGINE_SERVICES
    fi
    services=${services/#\~/$HOME}

    # The option whose value is being typed, as "--opt value", "--opt=value" (split at the
    # "=" by bash, whole in zsh).
    local opt=$prev val=$cur prefix=""
    if [[ $cur == "=" ]]; then
        opt=$prev val=""
    elif [[ $prev == "=" ]] && ((cword >= 2)); then
        opt=${COMP_WORDS[cword - 2]}
    elif [[ $cur == --*=* ]]; then
        opt=${cur%%=*} val=${cur#*=} prefix="$opt="
    fi

    if [[ -z $plan ]]; then
        if ((repl)); then
            case $opt in
                --services) _rrengine_files "$val" "" "$prefix"; return 0 ;;
            esac
            [[ $cur == -* ]] && _rrengine_reply $'--user\n--services\n-e\n--debug' "$cur"
            return 0
        fi
        case $opt in
            -e) return 0 ;;
        esac
        if [[ $cur == -* ]]; then
            _rrengine_reply $'-e\n-i\n--debug\n--version\n-h\n--help' "$cur"
        else
            _rrengine_reply "$(_rrengine_plans "$cmd")" "$cur"
            # a script of one's own, by its path
            ((${#COMPREPLY[@]} == 0)) && [[ $cur == */* || $cur == .* ]] && _rrengine_files "$cur"
        fi
        return 0
    fi

    local options meta
    options=$(_rrengine_plan_options "$cmd" "$plan")
    if [[ -z $options ]]; then
        _rrengine_files "$cur" # a script without a usage: its arguments are its business
        return 0
    fi
    # the metavariable of $opt when it takes a value ("--services FILE" -> FILE)
    meta=$(printf '%s\n' "$options" | awk -v o="$opt" '$1 == o && NF > 1 { print $2; exit }')
    if [[ -n $meta && ( $prev == "$opt" || $prev == "=" || -n $prefix || $cur == "=" ) ]]; then
        case $opt:$meta in
            --service:NAME)
                # a comma list: complete its last item
                local head=""
                [[ $val == *,* ]] && head=${val%,*},
                _rrengine_reply "$(_rrengine_services "$cmd" "$services" "$user")" "${val##*,}" "$prefix$head" ;;
            *:FILE) _rrengine_files "$val" "" "$prefix" ;;
            *:DIR) _rrengine_files "$val" dirs "$prefix" ;;
        esac
        return 0
    fi
    if [[ $cur == -* ]]; then
        _rrengine_reply "$(printf '%s\n' "$options" | awk '{ print $1 }')" "$cur"
    elif [[ $plan == *timeline.lua ]]; then
        _rrengine_files "$cur" # the events file
    fi
    return 0
}

complete -F _rrengine rrengine
