#!/usr/bin/env bash
# download.sh: fetch Meta Llama 3 checkpoints with the signed URL from Meta's access e-mail,
# resume interrupted downloads, and verify every file against the model's checklist.chk.
# Run `./download.sh --help` for the options; docs/download.md has the details.

# ------------------------------------------------------------------------------------------
# The models this script knows. One line per model:
#   name            the name users type (case does not matter)
#   folder          the local folder the files go to
#   remote          the path that replaces the `*` in the signed URL (plus /FILE)
#   shards          number of consolidated.NN.pth files
#   size_gb         approximate download size in GB, only for the free-space warning
# To add a model (for example a Llama 3.1 link), add a line here.
# ------------------------------------------------------------------------------------------
MODEL_TABLE='
8B              Meta-Llama-3-8B             Meta-Llama-3-8B             1    17
8B-instruct     Meta-Llama-3-8B-Instruct    Meta-Llama-3-8B-Instruct    1    17
70B             Meta-Llama-3-70B            Meta-Llama-3-70B            8    142
70B-instruct    Meta-Llama-3-70B-Instruct   Meta-Llama-3-70B-Instruct   8    142
'
# Files fetched once, at the top of the target folder (their remote path is the same name).
TOP_LEVEL_FILES='LICENSE USE_POLICY'
# Files fetched into each model folder besides the consolidated.NN.pth shards.
MODEL_FILES='params.json tokenizer.model'
# ------------------------------------------------------------------------------------------

EXIT_OK=0
EXIT_BAD_INPUT=2
EXIT_DOWNLOAD=3
EXIT_VERIFY=4

REQUEST_URL_PAGE='https://llama.meta.com/llama-downloads/'
VERIFIED_MARKER='.download-verified'   # per model folder: "md5 size name" of verified files

PROG=${0##*/}
CURRENT_LOG=''

# ---- small helpers ------------------------------------------------------------------------
say() { printf '%s\n' "$*"; }
warn() { printf '%s\n' "WARNING: $*" >&2; }
err() { printf '%s\n' "ERROR: $*" >&2; }
die() { local code=$1; shift; err "$@"; exit "$code"; }

to_lower() { printf '%s' "$1" | tr '[:upper:]' '[:lower:]'; }

usage() {
    cat <<EOF
Usage: $PROG [--url URL] [--models LIST] [--target DIR] [options]

Downloads Meta Llama 3 checkpoints with the signed URL from Meta's access e-mail and verifies
them with each model's checklist.chk. Without --url / --models it asks for them, like Meta's
download.sh:
  Enter the URL from email:
  Enter the list of models to download without spaces ($(model_names_csv)), or press Enter for all:

Options:
  -u, --url URL          the signed URL from the e-mail (one '*')          env LLAMA_URL
  -m, --models LIST      comma-separated names; empty or 'all': all        env LLAMA_MODELS
                         known: $(model_names_csv)
  -t, --target DIR       folder to download into (default: current dir)    env LLAMA_TARGET
      --downloader TOOL  wget or curl (default: wget if installed)          env LLAMA_DOWNLOADER
      --retries N        extra attempts after a network failure (3)        env LLAMA_RETRIES
      --retry-wait S     seconds to wait before each retry (10)            env LLAMA_RETRY_WAIT
      --reverify         recompute checksums of files verified earlier
  -h, --help             show this help

Files: LICENSE and USE_POLICY in DIR; per model DIR/<folder>/ with consolidated.NN.pth,
params.json, tokenizer.model and checklist.chk. Downloads go to NAME.part and are renamed when
complete; running the script again resumes them and skips files already verified.
Checksums: md5sum -c, else md5 -r (macOS), else python3 hashlib.

Exit codes:
  0  success: every requested file downloaded and verified
  2  bad input (URL, model name, option, target folder); nothing was downloaded
  3  download failure (expired link / 403, 404, network, disk full, error page, no wget/curl)
  4  verification failure (checksum mismatch, missing file, or no md5 tool available)
  130 interrupted (Ctrl-C); run again to resume
When both downloads and verification failed, the exit code is 3.
EOF
}

# ---- the model table ----------------------------------------------------------------------
T_NAMES=() T_FOLDERS=() T_REMOTES=() T_SHARDS=() T_SIZES=()
load_table() {
    local name folder remote shards size
    while read -r name folder remote shards size; do
        [ -z "$name" ] && continue
        case $name in \#*) continue ;; esac
        T_NAMES+=("$name") T_FOLDERS+=("$folder") T_REMOTES+=("$remote")
        T_SHARDS+=("$shards") T_SIZES+=("${size:-0}")
    done <<EOF
$MODEL_TABLE
EOF
}

model_names_csv() {
    local IFS=,
    printf '%s' "${T_NAMES[*]}"
}

# Index of a model in the table (matching name or folder, case-insensitively), or return 1.
model_index() {
    local wanted i
    wanted=$(to_lower "$1")
    for i in "${!T_NAMES[@]}"; do
        if [ "$wanted" = "$(to_lower "${T_NAMES[$i]}")" ] ||
           [ "$wanted" = "$(to_lower "${T_FOLDERS[$i]}")" ]; then
            printf '%s' "$i"
            return 0
        fi
    done
    return 1
}

# ---- the signed URL -----------------------------------------------------------------------
# Cleans the URL in $URL (quotes, whitespace, line breaks) and checks it; exits 2 if unusable.
clean_and_check_url() {
    local url=$1 notes=() stars ws
    # Whitespace of any kind (spaces, tabs, CR, line breaks) cannot be part of a URL.
    ws=$(printf ' \t\r\n')
    case $url in
        *["$ws"]*)
            url=$(printf '%s' "$url" | tr -d ' \t\r\n')
            notes+=("removed spaces/line breaks") ;;
    esac
    # Surrounding quotes or angle brackets from copying.
    while :; do
        case $url in
            \"*\" | \'*\' | \<*\>) url=${url:1:${#url}-2}; notes+=("removed surrounding quotes/brackets") ;;
            \"* | \'*) url=${url:1}; notes+=("removed a leading quote") ;;
            *\" | *\') url=${url:0:${#url}-1}; notes+=("removed a trailing quote") ;;
            *) break ;;
        esac
    done
    if [ ${#notes[@]} -gt 0 ]; then
        local joined='' note
        for note in "${notes[@]}"; do joined="$joined${joined:+; }$note"; done
        say "Note: cleaned up the URL you gave: $joined."
    fi
    if [ -z "$url" ]; then
        die $EXIT_BAD_INPUT "no URL given. Paste the URL from Meta's e-mail (it starts with https:// and contains a '*')."
    fi
    case $url in
        *safelinks.protection.outlook.com* | *urldefense* | *google.com/url\?* | *mimecast* | *proofpoint*)
            die $EXIT_BAD_INPUT "this is not Meta's URL: your e-mail client or mail filter rewrote the link.
  Do not use 'Copy link' on the e-mail's link; select and copy the URL text itself as it is
  written in the e-mail (it starts with https://download and contains a '*')." ;;
    esac
    case $url in
        http://* | https://*) ;;
        *) die $EXIT_BAD_INPUT "the URL must start with https:// (got '${url:0:40}...').
  Copy the whole URL from Meta's e-mail." ;;
    esac
    stars=${url//[!*]/}
    if [ ${#stars} -eq 0 ]; then
        case $url in
            *%2[aA]*)
                die $EXIT_BAD_INPUT "the URL's '*' is percent-encoded as %2A: the link was rewritten when it was copied.
  Copy the URL text from the e-mail instead of using 'Copy link', or replace %2A by '*'." ;;
        esac
        die $EXIT_BAD_INPUT "the URL contains no '*'. Meta's download URL has exactly one '*', which this script
  replaces with each file's path. Copy the whole URL text from the e-mail."
    fi
    if [ ${#stars} -gt 1 ]; then
        die $EXIT_BAD_INPUT "the URL contains ${#stars} '*' characters; it must contain exactly one.
  Was it pasted twice? Copy the URL from the e-mail once, in one piece."
    fi
    case $url in
        *\?*) ;;
        *) warn "the URL has no '?...' part (Policy, Signature, Key-Pair-Id): it is probably cut short." ;;
    esac
    URL=$url
    URL_PREFIX=${url%%\**}
    URL_SUFFIX=${url#*\*}
}

url_for() { printf '%s%s%s' "$URL_PREFIX" "$1" "$URL_SUFFIX"; }

advice_403() {
    cat >&2 <<EOF
  The server answered 403 Forbidden: the download link has expired or has been used up.
  Meta's links are valid for 24 hours and for a limited number of downloads. Request a new
  link at $REQUEST_URL_PAGE and run this script again with it: files
  already downloaded are kept and partial files resume.
  If the link is new, check how it was copied:
    - copy the URL text as written in the e-mail; 'Copy link' in some e-mail clients gives a
      rewritten (tracking/safe-links) URL that does not work;
    - paste it in one piece: a line break inside the URL cuts it short;
    - the whole URL is needed, including everything after the '?' (Policy, Signature,
      Key-Pair-Id).
  If other files of this link downloaded fine, the requested file may not exist for your link
  (check the model name: a Llama 3 link does not serve other model families).
EOF
}

# ---- tools --------------------------------------------------------------------------------
have() { command -v "$1" >/dev/null 2>&1; }

pick_downloader() {
    local wanted=$1
    case $wanted in
        '') if have wget; then DOWNLOADER=wget; elif have curl; then DOWNLOADER=curl; else
                die $EXIT_DOWNLOAD "neither wget nor curl is installed; install one of them
  (Debian/Ubuntu: sudo apt-get install wget; macOS has curl) and run this script again."
            fi ;;
        wget | curl)
            have "$wanted" || die $EXIT_DOWNLOAD "--downloader $wanted: $wanted is not installed."
            DOWNLOADER=$wanted ;;
        *) die $EXIT_BAD_INPUT "--downloader must be wget or curl (got '$wanted')." ;;
    esac
}

pick_hasher() {
    if have md5sum; then HASHER=md5sum
    elif have md5 && [ "$(printf '' | md5 -r 2>/dev/null | cut -c1-32)" = d41d8cd98f00b204e9800998ecf8427e ]; then
        HASHER=md5
    elif have python3 && python3 -S -c 'import hashlib' >/dev/null 2>&1; then HASHER=python3
    else
        die $EXIT_VERIFY "cannot verify downloads: none of md5sum, md5 or python3 is available.
  Install coreutils (md5sum) or python3 and run this script again. Nothing was downloaded."
    fi
}

# Prints the md5 of a file (lowercase hex) with the chosen tool.
md5_of() {
    case $HASHER in
        md5sum) md5sum -- "$1" | cut -c1-32 ;;
        md5) md5 -r -- "$1" | cut -c1-32 ;;
        python3)
            python3 -S - "$1" <<'PY'
import hashlib, sys
try:
    h = hashlib.md5(usedforsecurity=False)
except TypeError:
    h = hashlib.md5()
with open(sys.argv[1], "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
print(h.hexdigest())
PY
            ;;
    esac
}

# True if FILE matches MD5. With md5sum this is `md5sum -c`.
md5_matches() {
    local file=$1 want=$2 got
    if [ "$HASHER" = md5sum ]; then
        printf '%s  %s\n' "$want" "$file" | md5sum -c - >/dev/null 2>&1
        return
    fi
    got=$(md5_of "$file") || return 1
    [ "$(to_lower "$got")" = "$(to_lower "$want")" ]
}

file_size() { wc -c <"$1" | tr -d ' '; }

free_kb() { df -Pk "$1" 2>/dev/null | awk 'NR == 2 { print $4 }'; }

# Says whether a file starts like an HTML/XML page (an error page saved instead of the data).
looks_like_markup() {
    local head
    head=$(head -c 256 "$1" 2>/dev/null | LC_ALL=C tr -d '\000' | LC_ALL=C tr -d ' \t\r\n' | LC_ALL=C tr '[:upper:]' '[:lower:]')
    head=${head#$'\xef\xbb\xbf'}
    case $head in
        '<!doctype'* | '<html'* | '<?xml'* | '<head'* | '<body'* | '<error'*) return 0 ;;
    esac
    return 1
}

markup_summary() {
    local title
    title=$(head -c 4096 "$1" 2>/dev/null | LC_ALL=C tr -d '\000' | tr '\n\r' '  ' |
        sed -n 's/.*<[Tt][Ii][Tt][Ll][Ee][^>]*>\([^<]*\)<.*/\1/p; s/.*<Code>\([^<]*\)<.*/\1/p' | head -n 1)
    [ -n "$title" ] && printf ' (page says: %s)' "${title:0:120}"
}

# ---- downloading --------------------------------------------------------------------------
# Runs the downloader once: URL -> PART (resuming). Sets DL_KIND to one of
# ok | http | network | write | norange | other, and DL_HTTP to the HTTP status if known.
run_downloader() {
    local url=$1 part=$2 rc log
    DL_HTTP=''
    if [ "$DOWNLOADER" = wget ]; then
        local progress=()
        [ -t 2 ] && progress=(--show-progress --progress=bar:force:noscroll)
        # wget's messages (which repeat the signed URL) go to a log; only the progress bar is
        # shown. On failure the log is shown with the URL's signature hidden.
        log="$part.log"
        CURRENT_LOG=$log
        LC_ALL=C wget --continue --tries=1 --timeout=60 --no-verbose ${progress[@]+"${progress[@]}"} \
            --output-file="$log" -O "$part" -- "$url"
        rc=$?
        DL_HTTP=$(sed -n 's/.*ERROR \([0-9][0-9][0-9]\).*/\1/p' "$log" 2>/dev/null | tail -n 1)
        if [ "$rc" -ne 0 ]; then
            [ -z "$DL_HTTP" ] && grep -q -e 'Cannot write to' -e 'No space left' -e 'Is a directory' \
                -e 'Permission denied' -e 'Read-only file system' "$log" 2>/dev/null && rc=3
            sed -e 's/?[^ ]*/?<signature hidden>/g' -e 's/^/  wget: /' "$log" 2>/dev/null | grep -v '^  wget: *$' >&2
        fi
        rm -f "$log"
        CURRENT_LOG=''
        case $rc in
            0) DL_KIND=ok ;;
            8) DL_KIND=http ;;
            3) DL_KIND='write' ;;
            4 | 5 | 7) DL_KIND=network ;;
            *) DL_KIND=other ;;
        esac
    else
        local progress=()
        [ -t 2 ] || progress=(--silent --show-error)
        DL_HTTP=$(LC_ALL=C curl --location --fail --continue-at - --connect-timeout 30 \
            --speed-limit 1 --speed-time 120 ${progress[@]+"${progress[@]}"} \
            --output "$part" --write-out '%{http_code}' -- "$url")
        rc=$?
        case $DL_HTTP in 000) DL_HTTP='' ;; esac
        case $rc in
            0) DL_KIND=ok ;;
            22) DL_KIND=http ;;
            23) DL_KIND='write' ;;
            33) DL_KIND=norange ;;
            5 | 6 | 7 | 16 | 18 | 28 | 35 | 52 | 55 | 56 | 92) DL_KIND=network ;;
            *) DL_KIND=other ;;
        esac
    fi
    DL_RC=$rc
    if [ "$DL_KIND" = http ] && [ "$DL_HTTP" = 416 ] && [ -s "$part" ]; then
        # Asked to resume at or past the end: the .part already holds the whole file.
        DL_KIND=ok
    fi
    # A failed request must not leave an empty .part behind.
    if [ "$DL_KIND" != ok ] && [ -f "$part" ] && [ ! -s "$part" ]; then rm -f "$part"; fi
    if [ "$DL_KIND" = ok ] && [ ! -f "$part" ]; then
        # A zero-byte file: some tools create nothing when the body is empty.
        : >"$part" || DL_KIND='write'
    fi
}

# Downloads REMOTE to DEST (via DEST.part) unless DEST already exists. Returns 0 on success;
# otherwise sets FAIL (http403 | http404 | http | network | write | markup | other).
fetch() {
    local remote=$1 dest=$2 part="$2.part" attempt=0 url
    FAIL=''
    if [ -f "$dest" ]; then
        say "  $dest: already downloaded, not fetching it again"
        return 0
    fi
    if [ -e "$dest.bad" ]; then
        say "  $dest.bad: removing the bad copy kept from an earlier run"
        rm -f "$dest.bad"
    fi
    url=$(url_for "$remote")
    if [ -d "$part" ]; then
        FAIL='write'
        err "$part is a folder; remove it and run this script again."
        return 1
    fi
    if [ -s "$part" ]; then
        say "Resuming $dest (have $(file_size "$part") bytes)"
    else
        say "Downloading $dest"
    fi
    while :; do
        run_downloader "$url" "$part"
        case $DL_KIND in
            ok) break ;;
            norange)
                warn "the server cannot resume $dest; downloading it from the start."
                rm -f "$part" ;;
            http)
                case $DL_HTTP in
                    403) FAIL=http403; err "403 Forbidden for $remote"; return 1 ;;
                    404) FAIL=http404
                        err "404 Not Found for $remote: the server has no such file.
  Check the model name (the link from Meta's e-mail only serves the models it was issued for)
  and that the URL was copied completely."
                        return 1 ;;
                    5??) ;;  # server trouble: retry below
                    *) FAIL=http; err "the server answered HTTP ${DL_HTTP:-error} for $remote."; return 1 ;;
                esac ;;
            write)
                FAIL='write'
                err "could not write $part (disk full or no permission?)."
                local avail; avail=$(free_kb "$(dirname "$part")")
                [ -n "$avail" ] && say "  Free space there: $((avail / 1024)) MiB." >&2
                say "  Free some space (or pick another --target) and run this script again: the download resumes." >&2
                return 1 ;;
        esac
        if [ "$DL_KIND" = other ]; then
            FAIL=other
            err "downloading $remote failed ($DOWNLOADER exit code $DL_RC)."
            return 1
        fi
        if [ "$DL_KIND" = network ] || [ "$DL_KIND" = http ]; then
            if [ "$attempt" -ge "$RETRIES" ]; then
                FAIL=network
                if [ "$DL_KIND" = http ]; then
                    err "the server failed (HTTP $DL_HTTP) while sending $remote, $((RETRIES + 1)) times."
                else
                    err "network failure while downloading $remote ($DOWNLOADER exit code $DL_RC, $((RETRIES + 1)) attempts)."
                fi
                if [ -s "$part" ]; then
                    say "  Kept the partial file ${part} ($(file_size "$part") bytes)." >&2
                fi
                say "  Check your connection and run this script again (same command, within the link's 24 hours):
  it resumes partial files and skips verified ones." >&2
                return 1
            fi
        fi
        attempt=$((attempt + 1))
        local have=0
        [ -f "$part" ] && have=$(file_size "$part")
        say "  retrying $dest in ${RETRY_WAIT}s (attempt $((attempt + 1)) of $((RETRIES + 1))), resuming from byte $have"
        sleep "$RETRY_WAIT"
    done
    if looks_like_markup "$part"; then
        FAIL=markup
        mv -f "$part" "$dest.bad"
        err "$dest: the server sent an HTML/XML page instead of the file$(markup_summary "$dest.bad").
  Kept it as $dest.bad for inspection; it is not used. This usually means the link is wrong or
  expired, or a proxy/captive portal answered. Check the URL and run this script again."
        return 1
    fi
    if ! mv -f "$part" "$dest"; then
        FAIL='write'
        err "could not rename $part to $dest."
        return 1
    fi
    return 0
}

# ---- verification -------------------------------------------------------------------------
# Checks that FILE is in md5sum format ("<32 hex>  name" per line, plain file names).
checklist_ok() {
    local line n=0
    while IFS= read -r line || [ -n "$line" ]; do
        line=${line%$'\r'}
        [ -z "$line" ] && continue
        [[ $line =~ ^[0-9a-fA-F]{32}\ [\ *][^/]+$ ]] || return 1
        case ${line:34} in .* | *..*) return 1 ;; esac
        n=$((n + 1))
    done <"$1"
    [ "$n" -gt 0 ]
}

# Verifies the files of a model folder against its checklist.chk. Appends to BAD_FILES.
verify_model() {
    local dir=$1; shift
    local expected=("$@") line sum name size msum msize mname i
    local names=() sums=() marker="$dir/$VERIFIED_MARKER" new_marker=() failures=0
    local m_names=() m_sums=() m_sizes=()
    while IFS= read -r line || [ -n "$line" ]; do
        line=${line%$'\r'}
        [ -z "$line" ] && continue
        sums+=("$(to_lower "${line:0:32}")")
        names+=("${line:34}")
    done <"$dir/checklist.chk"
    if [ -f "$marker" ] && [ "$REVERIFY" != 1 ]; then
        while read -r msum msize mname; do
            [ -n "$mname" ] || continue
            m_sums+=("$msum") m_sizes+=("$msize") m_names+=("$mname")
        done <"$marker"
    fi
    for name in "${expected[@]}"; do
        local covered=0
        for i in "${!names[@]}"; do [ "${names[$i]}" = "$name" ] && covered=1; done
        [ $covered = 1 ] || warn "$dir/$name is not listed in $dir/checklist.chk, so it cannot be verified."
    done
    say "Verifying $dir with checklist.chk (using $HASHER)"
    for i in "${!names[@]}"; do
        name=${names[$i]} sum=${sums[$i]}
        if [ ! -f "$dir/$name" ]; then
            say "  $name: MISSING (not downloaded)"
            BAD_FILES+=("$dir/$name (missing)")
            failures=$((failures + 1))
            continue
        fi
        size=$(file_size "$dir/$name")
        local j known=0
        for j in "${!m_names[@]}"; do
            if [ "${m_names[$j]}" = "$name" ] && [ "${m_sums[$j]}" = "$sum" ] && [ "${m_sizes[$j]}" = "$size" ]; then
                known=1
            fi
        done
        if [ $known = 1 ]; then
            say "  $name: OK (verified by an earlier run)"
            new_marker+=("$sum $size $name")
            continue
        fi
        if md5_matches "$dir/$name" "$sum"; then
            say "  $name: OK"
            new_marker+=("$sum $size $name")
        else
            say "  $name: FAILED checksum"
            mv -f "$dir/$name" "$dir/$name.bad"
            err "$dir/$name does not match its checksum. Renamed it to $name.bad; run this script
  again to download it again."
            BAD_FILES+=("$dir/$name (checksum mismatch, renamed to $name.bad)")
            failures=$((failures + 1))
        fi
    done
    if [ ${#new_marker[@]} -gt 0 ]; then
        local content old=''
        content=$(printf '%s\n' "${new_marker[@]}")
        [ -f "$marker" ] && old=$(cat "$marker")
        if [ "$content" != "$old" ]; then
            printf '%s\n' "$content" >"$marker" 2>/dev/null || warn "could not write $marker"
        fi
    else
        rm -f "$marker"
    fi
    [ $failures -eq 0 ]
}

# ---- main ---------------------------------------------------------------------------------
# shellcheck disable=SC2317  # called by the trap
on_signal() {
    [ -n "$CURRENT_LOG" ] && rm -f "$CURRENT_LOG"
    printf '\n%s\n' "Interrupted. Run this script again to resume: partial downloads (*.part) are kept." >&2
    exit 130
}

# Reads one line from stdin after printing PROMPT to stderr; sets REPLY_LINE, returns 1 on EOF.
ask() {
    printf '%s' "$1" >&2
    REPLY_LINE=''
    if IFS= read -r REPLY_LINE; then
        [ -t 0 ] || printf '\n' >&2
        return 0
    fi
    [ -n "$REPLY_LINE" ] && return 0
    printf '\n' >&2
    return 1
}

# A line that can only be the rest of a URL pasted with a line break in it.
looks_like_url_piece() {
    case $1 in *,*) return 1 ;; esac
    case $1 in *[=\&%?/:_~]*) return 0 ;; esac
    [ ${#1} -gt 40 ]
}

main() {
    load_table
    local url_set=0 models_set=0 target_set=0
    URL=${LLAMA_URL-} MODELS=${LLAMA_MODELS-} TARGET=${LLAMA_TARGET-}
    [ -n "${LLAMA_URL+x}" ] && url_set=1
    [ -n "${LLAMA_MODELS+x}" ] && models_set=1
    [ -n "${LLAMA_TARGET+x}" ] && target_set=1
    local downloader=${LLAMA_DOWNLOADER-}
    RETRIES=${LLAMA_RETRIES-3} RETRY_WAIT=${LLAMA_RETRY_WAIT-10} REVERIFY=0

    while [ $# -gt 0 ]; do
        local opt=$1 val=''
        case $opt in
            --*=*) val=${opt#*=}; opt=${opt%%=*} ;;
            -h | --help) usage; exit $EXIT_OK ;;
            --reverify) REVERIFY=1; shift; continue ;;
            -u | --url | -m | --models | -t | --target | --downloader | --retries | --retry-wait)
                [ $# -ge 2 ] || die $EXIT_BAD_INPUT "$opt needs a value (see --help)."
                val=$2; shift ;;
            *) die $EXIT_BAD_INPUT "unknown argument '$opt' (see --help)." ;;
        esac
        shift
        case $opt in
            -u | --url) URL=$val url_set=1 ;;
            -m | --models) MODELS=$val models_set=1 ;;
            -t | --target) TARGET=$val target_set=1 ;;
            --downloader) downloader=$val ;;
            --retries) RETRIES=$val ;;
            --retry-wait) RETRY_WAIT=$val ;;
            *) die $EXIT_BAD_INPUT "unknown argument '$opt' (see --help)." ;;
        esac
    done
    case $RETRIES in '' | *[!0-9]*) die $EXIT_BAD_INPUT "--retries must be a number (got '$RETRIES')." ;; esac
    case $RETRY_WAIT in '' | *[!0-9]*) die $EXIT_BAD_INPUT "--retry-wait must be a number of seconds (got '$RETRY_WAIT')." ;; esac
    [ $target_set = 1 ] && [ -n "$TARGET" ] || TARGET=.

    # -- the two questions of Meta's script, for whatever was not given ------------------
    local pending_models='' have_pending=0 more pieces=1
    if [ $url_set = 0 ]; then
        ask "Enter the URL from email: " || die $EXIT_BAD_INPUT "no URL given (use --url URL or LLAMA_URL, or answer the prompt)."
        URL=$REPLY_LINE
        # A URL pasted with line breaks arrives as several lines at once: join the pieces.
        local gap=1
        [ "${BASH_VERSINFO[0]}" -ge 4 ] && gap=0.3
        while IFS= read -r -t "$gap" more; do
            if looks_like_url_piece "$more"; then
                URL=$URL$more pieces=$((pieces + 1))
            else
                pending_models=$more have_pending=1
                break
            fi
        done
        [ $pieces -gt 1 ] && say "Note: the URL arrived in $pieces lines (line breaks in the paste); joined them into one."
        echo
    fi
    clean_and_check_url "$URL"

    if [ $models_set = 0 ]; then
        if [ $have_pending = 1 ]; then
            printf '%s%s\n' "Enter the list of models to download without spaces ($(model_names_csv)), or press Enter for all: " "$pending_models" >&2
            MODELS=$pending_models
        elif ask "Enter the list of models to download without spaces ($(model_names_csv)), or press Enter for all: "; then
            MODELS=$REPLY_LINE
        else
            MODELS=''
            say "(no answer: downloading all models)"
        fi
    fi

    # -- which models: reject unknown names before anything is downloaded ----------------
    local selected=() item idx unknown=() s
    MODELS=$(printf '%s' "$MODELS" | tr -d ' \t\r\n')
    case $(to_lower "$MODELS") in '' | all) MODELS=$(model_names_csv) ;; esac
    local IFS_SAVE=$IFS
    IFS=,
    # shellcheck disable=SC2086  # split on commas on purpose
    set -- $MODELS
    IFS=$IFS_SAVE
    for item in "$@"; do
        [ -z "$item" ] && continue
        if idx=$(model_index "$item"); then
            local dup=0
            for s in ${selected[@]+"${selected[@]}"}; do [ "$s" = "$idx" ] && dup=1; done
            [ $dup = 0 ] && selected+=("$idx")
        else
            unknown+=("$item")
        fi
    done
    if [ ${#unknown[@]} -gt 0 ]; then
        die $EXIT_BAD_INPUT "unknown model name(s): ${unknown[*]}. Nothing was downloaded.
  Valid names: $(model_names_csv) (comma-separated, no spaces; empty for all)."
    fi
    [ ${#selected[@]} -gt 0 ] || die $EXIT_BAD_INPUT "no model selected. Valid names: $(model_names_csv)."

    # -- tools, target folder, free space ------------------------------------------------
    pick_downloader "$downloader"
    pick_hasher
    mkdir -p -- "$TARGET" 2>/dev/null || die $EXIT_BAD_INPUT "cannot create the target folder '$TARGET'."
    cd -- "$TARGET" || die $EXIT_BAD_INPUT "cannot enter the target folder '$TARGET'."
    [ -w . ] || die $EXIT_BAD_INPUT "the target folder '$TARGET' is not writable."
    trap on_signal INT TERM

    local need_gb=0 avail
    for idx in "${selected[@]}"; do
        [ -f "${T_FOLDERS[$idx]}/$VERIFIED_MARKER" ] || need_gb=$((need_gb + T_SIZES[idx]))
    done
    avail=$(free_kb .)
    if [ -n "$avail" ] && [ "$need_gb" -gt 0 ] && [ "$avail" -lt $((need_gb * 976562)) ]; then
        warn "the selected models need about $need_gb GB but only $((avail / 1048576)) GiB is free in '$TARGET'.
  The download will stop when the disk is full; free space or use --target on a bigger disk."
    fi

    say "Downloading into $(pwd) with $DOWNLOADER; verifying with $HASHER."
    say "Models: $(for idx in "${selected[@]}"; do printf '%s ' "${T_NAMES[$idx]}"; done)"

    FAILED_DOWNLOADS=() BAD_FILES=()
    local f
    for f in $TOP_LEVEL_FILES; do
        if ! fetch "$f" "$f"; then
            FAILED_DOWNLOADS+=("$f")
            abort_if_fatal
        fi
    done

    local done_models=()
    for idx in "${selected[@]}"; do
        local name=${T_NAMES[$idx]} dir=${T_FOLDERS[$idx]} remote=${T_REMOTES[$idx]}
        local shards=${T_SHARDS[$idx]} files=() n model_failed=0
        say ""
        say "== $name -> $dir ($shards shard$([ "$shards" -gt 1 ] && echo s))"
        mkdir -p -- "$dir" || { err "cannot create $dir"; exit $EXIT_DOWNLOAD; }
        # checklist.chk first: a bad one (error page, wrong link) is caught before the big files.
        if ! fetch "$remote/checklist.chk" "$dir/checklist.chk"; then
            FAILED_DOWNLOADS+=("$dir/checklist.chk")
            abort_if_fatal
            say "  skipping the rest of $name"
            continue
        fi
        if ! checklist_ok "$dir/checklist.chk"; then
            local why=''
            looks_like_markup "$dir/checklist.chk" && why=" It is an HTML/XML page$(markup_summary "$dir/checklist.chk")."
            mv -f "$dir/checklist.chk" "$dir/checklist.chk.bad"
            err "$dir/checklist.chk is not a checksum list (expected md5sum lines '<md5>  <file>').$why
  Kept it as checklist.chk.bad; the link is probably wrong or expired. Skipping $name."
            FAILED_DOWNLOADS+=("$dir/checklist.chk (not a checksum list)")
            continue
        fi
        for ((n = 0; n < shards; n++)); do
            files+=("$(printf 'consolidated.%02d.pth' "$n")")
        done
        for f in $MODEL_FILES; do files+=("$f"); done
        for f in "${files[@]}"; do
            if ! fetch "$remote/$f" "$dir/$f"; then
                FAILED_DOWNLOADS+=("$dir/$f")
                model_failed=1
                abort_if_fatal
            fi
        done
        if verify_model "$dir" "${files[@]}" && [ $model_failed = 0 ]; then
            done_models+=("$name")
        fi
    done

    say ""
    [ ${#done_models[@]} -gt 0 ] && say "Downloaded and verified: ${done_models[*]}"
    if [ ${#FAILED_DOWNLOADS[@]} -gt 0 ]; then
        err "these downloads failed: ${FAILED_DOWNLOADS[*]}"
        [ ${#BAD_FILES[@]} -gt 0 ] && err "these files failed verification: ${BAD_FILES[*]}"
        say "Run this script again to retry; finished and verified files are kept." >&2
        exit $EXIT_DOWNLOAD
    fi
    if [ ${#BAD_FILES[@]} -gt 0 ]; then
        err "these files failed verification: ${BAD_FILES[*]}"
        say "Run this script again to download them again; verified files are kept." >&2
        exit $EXIT_VERIFY
    fi
    say "All done."
    exit $EXIT_OK
}

# After a failed fetch: stop everything for failures that will hit every other file too.
abort_if_fatal() {
    case $FAIL in
        http403) advice_403; exit $EXIT_DOWNLOAD ;;
        network | write) exit $EXIT_DOWNLOAD ;;
    esac
}

main "$@"
