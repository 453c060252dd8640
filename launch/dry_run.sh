# Shared by the shell launchers (sourced, not run): dry-run printing.
# Callers set dry_run=1 to print commands instead of running them.

# One shell word for $1, in single quotes where needed (readable, unlike %q).
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf %s "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}
# Runs (or with dry_run=1 prints, shell-quoted on one line) a command.
run() {
  if [ "$dry_run" = 1 ]; then
    local arg line=
    for arg in "$@"; do
      line+="${line:+ }$(quote "$arg")"
    done
    echo "$line"
  else
    "$@"
  fi
}
