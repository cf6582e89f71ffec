# bash completion for pubmon.   eval "$(pubmon completion bash)"
# Publisher names come from the running daemon (`pubmon status`, found the way pubmon finds it:
# --socket, $PUBMON_SOCKET, --config, $PUBMON_CONFIG).

_pubmon_names() {
    local where=() i
    for ((i = 1; i < ${#COMP_WORDS[@]} - 1; i++)); do
        case ${COMP_WORDS[i]} in
            --socket|--config|--host|--port) where+=("${COMP_WORDS[i]}" "${COMP_WORDS[i+1]}") ;;
        esac
    done
    pubmon status "${where[@]}" 2>/dev/null | awk 'NR > 1 && $2 !~ /^publishers?:$/ {print $1}'
    pubmon status --group "${where[@]}" 2>/dev/null | awk 'NR > 1 && $2 !~ /^publishers?:$/ {print $1}'
    echo all
}

_pubmon() {
    local cur prev cmd
    cur=${COMP_WORDS[COMP_CWORD]}
    prev=${COMP_WORDS[COMP_CWORD-1]}
    local commands="daemon demo check-config status start stop restart pause resume signal pid reload tail clear log counters upgrade completion"
    local options="--config --debug --socket --host --port --tls-ca --tls-cert --tls-key --timeout
        --no-wait --json --group --state --dry-run --timestamps -n -f --help --version"
    case $prev in
        --config|--tls-ca|--tls-cert|--tls-key|check-config)
            COMPREPLY=($(compgen -f -- "$cur")); return ;;
        --socket)
            COMPREPLY=($(compgen -f -- "$cur")); return ;;
        --state)
            COMPREPLY=($(compgen -W "stopped starting running backoff stopping exited fatal" -- "$cur")); return ;;
        --host|--port|--timeout|-n)
            return ;;
        completion)
            COMPREPLY=($(compgen -W "bash zsh" -- "$cur")); return ;;
    esac
    if [[ $COMP_CWORD -eq 1 ]]; then
        COMPREPLY=($(compgen -W "$commands --help --version" -- "$cur"))
        return
    fi
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$options" -- "$cur"))
        return
    fi
    cmd=${COMP_WORDS[1]}
    case $cmd in
        status|start|stop|restart|pause|resume|signal|pid|tail|clear)
            if [[ $cmd == signal && $COMP_CWORD -ge 3 ]]; then
                COMPREPLY=($(compgen -W "HUP INT QUIT USR1 USR2 TERM KILL CONT STOP" -- "$cur"))
                return
            fi
            COMPREPLY=($(compgen -W "$(_pubmon_names)" -- "$cur")) ;;
    esac
}

complete -F _pubmon pubmon
