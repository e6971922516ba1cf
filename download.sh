#!/usr/bin/env bash
# download.sh: fetch Meta's Llama 3, 3.1, 3.2, 3.3 and Llama Guard 3 checkpoints with the signed
# URL from Meta's access e-mail, resume interrupted downloads, and verify every file.
# Run `./download.sh --help` for the options; docs/download.md has the details.

# ------------------------------------------------------------------------------------------
# The models and link layouts this script knows (facts: Meta's download scripts of April and
# July 2024 and the model list of llama-models 0.3.0). Three generations of links exist:
#   A  Llama 3 links (April 2024): remote path differs from the local folder; md5 checklist.chk
#   B  Llama 3.1 links (July 2024): remote path = local folder; no checklist at all
#   C  links for the `llama` CLI (Sept 2024 on): remote path = local folder = the Hugging Face
#      repo name without owner; sha256 checklist.chk
# One line per model and layout:
#   model     one id per model; lines with the same id are its candidate layouts
#   L         layout (A, B, C)
#   remote    the path that replaces the `*` in the signed URL (plus /FILE)
#   folder    the local folder the files go to (also accepted as a name to type)
#   shards    number of consolidated.NN.pth files
#   extra     fp8: also fp8_scales_0.pt .. fp8_scales_N-1.pt; -: nothing else
#   policy    the top-level policy file fetched with LICENSE (-: the layout has no top-level files)
#   GB        approximate download size, only for the free-space warning
#   shard_B   one shard's size in bytes where Meta's model list gives it (0: not given)
#   names     the names users type for it (case-insensitive, comma-separated)
# ------------------------------------------------------------------------------------------
MODEL_TABLE='
#model          L remote                             folder                             shards extra policy        GB  shard_B       names
3-8b            A 8b_pre_trained                     Meta-Llama-3-8B                    1  -   USE_POLICY      16  0             8B
3-8b-i          A 8b_instruction_tuned               Meta-Llama-3-8B-Instruct           1  -   USE_POLICY      16  0             8B-instruct
3-70b           A 70b_pre_trained                    Meta-Llama-3-70B                   8  -   USE_POLICY     141  0             70B
3-70b-i         A 70b_instruction_tuned              Meta-Llama-3-70B-Instruct          8  -   USE_POLICY     141  0             70B-instruct
3.1-8b          B Meta-Llama-3.1-8B                  Meta-Llama-3.1-8B                  1  -   USE_POLICY.md   16  0             meta-llama-3.1-8b
3.1-8b-i        B Meta-Llama-3.1-8B-Instruct         Meta-Llama-3.1-8B-Instruct         1  -   USE_POLICY.md   16  0             meta-llama-3.1-8b-instruct
3.1-70b         B Meta-Llama-3.1-70B                 Meta-Llama-3.1-70B                 8  -   USE_POLICY.md  141  0             meta-llama-3.1-70b
3.1-70b-i       B Meta-Llama-3.1-70B-Instruct        Meta-Llama-3.1-70B-Instruct        8  -   USE_POLICY.md  141  0             meta-llama-3.1-70b-instruct
3.1-405b-mp16   B Meta-Llama-3.1-405B-MP16           Meta-Llama-3.1-405B-MP16          16  -   USE_POLICY.md  821  51268302389   meta-llama-3.1-405b-mp16
3.1-405b-i-mp16 B Meta-Llama-3.1-405B-Instruct-MP16  Meta-Llama-3.1-405B-Instruct-MP16 16  -   USE_POLICY.md  821  51268302389   meta-llama-3.1-405b-instruct-mp16
3.1-405b-mp8    B Meta-Llama-3.1-405B-MP8            Meta-Llama-3.1-405B-MP8            8  -   USE_POLICY.md  812  101470976045  meta-llama-3.1-405b-mp8
3.1-405b-i-mp8  B Meta-Llama-3.1-405B-Instruct-MP8   Meta-Llama-3.1-405B-Instruct-MP8   8  -   USE_POLICY.md  812  101470976045  meta-llama-3.1-405b-instruct-mp8
3.1-405b-fp8    B Meta-Llama-3.1-405B                Meta-Llama-3.1-405B                8  fp8 USE_POLICY.md  488  60903742309   meta-llama-3.1-405b-fp8
3.1-405b-i-fp8  B Meta-Llama-3.1-405B-Instruct       Meta-Llama-3.1-405B-Instruct       8  fp8 USE_POLICY.md  488  60903742309   meta-llama-3.1-405b-instruct-fp8
guard-3-8b      B Meta-Llama-Guard-3-8B              Meta-Llama-Guard-3-8B              1  -   USE_POLICY.md   16  0             meta-llama-guard-3-8b
3-8b            C Llama-3-8B                         Llama-3-8B                         1  -   -               16  0             Llama-3-8B
3-8b-i          C Llama-3-8B-Instruct                Llama-3-8B-Instruct                1  -   -               16  0             Llama-3-8B-Instruct
3-70b           C Llama-3-70B                        Llama-3-70B                        8  -   -              141  0             Llama-3-70B
3-70b-i         C Llama-3-70B-Instruct               Llama-3-70B-Instruct               8  -   -              141  0             Llama-3-70B-Instruct
3.1-8b          C Llama-3.1-8B                       Llama-3.1-8B                       1  -   -               16  0             Llama3.1-8B
3.1-8b-i        C Llama-3.1-8B-Instruct              Llama-3.1-8B-Instruct              1  -   -               16  0             Llama3.1-8B-Instruct
3.1-70b         C Llama-3.1-70B                      Llama-3.1-70B                      8  -   -              141  0             Llama3.1-70B
3.1-70b-i       C Llama-3.1-70B-Instruct             Llama-3.1-70B-Instruct             8  -   -              141  0             Llama3.1-70B-Instruct
3.1-405b-mp8    C Llama-3.1-405B-MP8                 Llama-3.1-405B-MP8                 8  -   -              812  101470976045  Llama3.1-405B:bf16-mp8
3.1-405b-i-mp8  C Llama-3.1-405B-Instruct-MP8        Llama-3.1-405B-Instruct-MP8        8  -   -              812  101470976045  Llama3.1-405B-Instruct:bf16-mp8
3.1-405b-mp16   C Llama-3.1-405B-MP16                Llama-3.1-405B-MP16               16  -   -              821  51268302389   Llama3.1-405B:bf16-mp16
3.1-405b-i-mp16 C Llama-3.1-405B-Instruct-MP16       Llama-3.1-405B-Instruct-MP16      16  -   -              821  51268302389   Llama3.1-405B-Instruct:bf16-mp16
3.1-405b-fp8    C Llama-3.1-405B                     Llama-3.1-405B                     8  fp8 -              488  60903742309   Llama3.1-405B
3.1-405b-i-fp8  C Llama-3.1-405B-Instruct            Llama-3.1-405B-Instruct            8  fp8 -              488  60903742309   Llama3.1-405B-Instruct
3.2-1b          C Llama-3.2-1B                       Llama-3.2-1B                       1  -   -                3  0             Llama3.2-1B
3.2-1b-i        C Llama-3.2-1B-Instruct              Llama-3.2-1B-Instruct              1  -   -                3  0             Llama3.2-1B-Instruct
3.2-3b          C Llama-3.2-3B                       Llama-3.2-3B                       1  -   -                7  0             Llama3.2-3B
3.2-3b-i        C Llama-3.2-3B-Instruct              Llama-3.2-3B-Instruct              1  -   -                7  0             Llama3.2-3B-Instruct
3.3-70b-i       C Llama-3.3-70B-Instruct             Llama-3.3-70B-Instruct             8  -   -              141  0             Llama3.3-70B-Instruct
guard-3-8b      C Llama-Guard-3-8B                   Llama-Guard-3-8B                   1  -   -               16  0             Llama-Guard-3-8B
guard-3-1b      C Llama-Guard-3-1B                   Llama-Guard-3-1B                   1  -   -                3  0             Llama-Guard-3-1B
'
# Models Meta's links also serve that this library cannot run: refused before any download.
#   names (comma-separated; case-insensitive)   |  what it is  |  what to download instead
UNSUPPORTED_TABLE='
Llama3.2-11B-Vision,Llama-3.2-11B-Vision                     | a vision model                    | Llama3.2-3B or Llama3.1-8B (text only)
Llama3.2-11B-Vision-Instruct,Llama-3.2-11B-Vision-Instruct   | a vision model                    | Llama3.2-3B-Instruct or Llama3.1-8B-Instruct (text only)
Llama3.2-90B-Vision,Llama-3.2-90B-Vision                     | a vision model                    | Llama3.1-70B (text only)
Llama3.2-90B-Vision-Instruct,Llama-3.2-90B-Vision-Instruct   | a vision model                    | Llama3.3-70B-Instruct or Llama3.1-70B-Instruct (text only)
Llama-Guard-3-11B-Vision                                     | a vision model                    | Llama-Guard-3-8B or Llama-Guard-3-1B
Llama3.2-1B-Instruct:int4-qlora-eo8,Llama-3.2-1B-Instruct-QLORA_INT4_EO8         | a QLoRA INT4 quantized model     | Llama3.2-1B-Instruct (bf16)
Llama3.2-1B-Instruct:int4-spinquant-eo8,Llama-3.2-1B-Instruct-SpinQuant_INT4_EO8 | a SpinQuant INT4 quantized model | Llama3.2-1B-Instruct (bf16)
Llama3.2-3B-Instruct:int4-qlora-eo8,Llama-3.2-3B-Instruct-QLORA_INT4_EO8         | a QLoRA INT4 quantized model     | Llama3.2-3B-Instruct (bf16)
Llama3.2-3B-Instruct:int4-spinquant-eo8,Llama-3.2-3B-Instruct-SpinQuant_INT4_EO8 | a SpinQuant INT4 quantized model | Llama3.2-3B-Instruct (bf16)
Llama-Guard-3-1B:int4,Llama-Guard-3-1B-INT4                  | an INT4 (ExecuTorch .pte) model   | Llama-Guard-3-1B
Llama-Guard-3-8B:int8,Llama-Guard-3-8B-INT8,Llama-Guard-3-8B-INT8-HF | a Hugging Face-format INT8 model | Llama-Guard-3-8B
'
# What each layout's links are called, for messages and the prompt.
layout_title() {
    case $1 in
        A) printf 'Llama 3 links (April 2024)' ;;
        B) printf 'Llama 3.1 links (July 2024)' ;;
        C) printf 'llama CLI links (Sept 2024 on: Llama 3, 3.1, 3.2, 3.3, Llama Guard 3)' ;;
    esac
}
# Files fetched into each model folder besides the shards and fp8 scales.
MODEL_FILES='params.json tokenizer.model'
# One request may not ask for more bytes than this; bigger files are fetched as byte ranges.
RANGE_LIMIT=${LLAMA_RANGE_LIMIT:-27000000000}
# ------------------------------------------------------------------------------------------

EXIT_OK=0
EXIT_BAD_INPUT=2
EXIT_DOWNLOAD=3
EXIT_VERIFY=4

REQUEST_URL_PAGE='https://llama.meta.com/llama-downloads/'
# Per model folder: "KIND ALGO HASH SIZE MTIME NAME" per file. KIND is `checked` (matched
# checklist.chk) or `recorded` (no checklist: the hash taken after download, for later runs).
VERIFIED_MARKER='.download-verified'

PROG=${0##*/}
CURRENT_LOG=''

# ---- small helpers ------------------------------------------------------------------------
say() { printf '%s\n' "$*"; }
warn() { printf '%s\n' "WARNING: $*" >&2; }
err() { printf '%s\n' "ERROR: $*" >&2; }
die() { local code=$1; shift; err "$@"; exit "$code"; }

to_lower() { printf '%s' "$1" | tr '[:upper:]' '[:lower:]'; }

usage() {
    cat <<EOF2
Usage: $PROG [--url URL] [--models LIST] [--target DIR] [options]

Downloads Meta's Llama 3, 3.1, 3.2, 3.3 and Llama Guard 3 checkpoints with the signed URL from
Meta's access e-mail and verifies them. Without --url / --models it asks for them, like Meta's
download.sh:
  Enter the URL from email:
  Enter the list of models to download without spaces (...), or press Enter for all:

Options:
  -u, --url URL          the signed URL from the e-mail (one '*')          env LLAMA_URL
  -m, --models LIST      comma-separated names; empty or 'all': every model
                         of a Llama 3 or Llama 3.1 link                    env LLAMA_MODELS
  -t, --target DIR       folder to download into (default: current dir)    env LLAMA_TARGET
      --downloader TOOL  wget or curl (default: wget if installed)          env LLAMA_DOWNLOADER
      --retries N        extra attempts after a network failure (3)        env LLAMA_RETRIES
      --retry-wait S     seconds to wait before each retry (10)            env LLAMA_RETRY_WAIT
      --reverify         hash every file again, even those an earlier run verified
  -h, --help             show this help

Model names (case-insensitive; a model's local folder name works too):
$(names_by_family '  ')
Not downloadable here (this library cannot run them): vision models, QLoRA/SpinQuant INT4
models, the HF-format Llama Guard 3 8B INT8.

Which link layout your URL serves (Llama 3, Llama 3.1 or llama CLI) is found out by asking for
params.json under each candidate path of the first model. Files go to DIR/<folder>/ (and
LICENSE, USE_POLICY or USE_POLICY.md to DIR for Llama 3 and 3.1 links), through NAME.part,
renamed when complete; running the script again resumes them and skips verified files.
Files over $RANGE_LIMIT bytes (env LLAMA_RANGE_LIMIT) are fetched as byte ranges of at
most that size with curl (wget cannot send a bounded Range header), resumable range by range.
Checksums: checklist.chk lines of 32 hex digits are md5, of 64 are sha256 (md5sum / md5 -r,
sha256sum / shasum -a 256, else python3). Llama 3.1 links have no checklist: their files are
reported as not verified and their sha256 is recorded so later runs can tell a changed file.
An earlier run's verification is trusted only while the file's size and modification time are
unchanged; a file changed since is hashed again. --reverify hashes everything again.

Exit codes:
  0  success: every requested file downloaded (and verified, where the link has a checklist)
  2  bad input (URL, model name, unsupported model, option, target folder); nothing downloaded
  3  download failure (expired link / 403, 404, network, disk full, error page, bad
     checklist.chk, no wget/curl)
  4  verification failure (checksum mismatch, changed file, missing file, or no hash tool)
  130 interrupted (Ctrl-C); run again to resume
When both downloads and verification failed, the exit code is 3.
EOF2
}

trim() { local s=$1; s=${s#"${s%%[![:space:]]*}"}; printf '%s' "${s%"${s##*[![:space:]]}"}"; }

# ---- the model table ----------------------------------------------------------------------
T_MODEL=() T_LAYOUT=() T_REMOTE=() T_FOLDER=() T_SHARDS=() T_EXTRA=() T_POLICY=() T_GB=()
T_BYTES=() T_NAMES=()
U_NAMES=() U_WHAT=() U_INSTEAD=()
load_tables() {
    local model layout remote folder shards extra policy gb bytes names line
    while read -r model layout remote folder shards extra policy gb bytes names; do
        case $model in '' | \#*) continue ;; esac
        T_MODEL+=("$model") T_LAYOUT+=("$layout") T_REMOTE+=("$remote") T_FOLDER+=("$folder")
        T_SHARDS+=("$shards") T_EXTRA+=("$extra") T_POLICY+=("$policy") T_GB+=("$gb")
        T_BYTES+=("$bytes") T_NAMES+=("$names")
    done <<EOF2
$MODEL_TABLE
EOF2
    # Lowercase ",names,folder," of every row, made with one `tr` (names are case-insensitive).
    T_KEYS=()
    while IFS= read -r line; do T_KEYS+=("$line"); done <<EOF2
$(for i in "${!T_MODEL[@]}"; do printf ',%s,%s,\n' "${T_NAMES[$i]}" "${T_FOLDER[$i]}"; done | tr '[:upper:]' '[:lower:]')
EOF2
    while IFS='|' read -r names model line; do
        [ -z "$names" ] && continue
        U_NAMES+=("$(trim "$names")") U_WHAT+=("$(trim "$model")") U_INSTEAD+=("$(trim "$line")")
    done <<EOF2
$UNSUPPORTED_TABLE
EOF2
}

# The names of one layout's models, comma-separated, in table order.
layout_names() {
    local i out=''
    for i in "${!T_MODEL[@]}"; do
        [ "${T_LAYOUT[$i]}" = "$1" ] && out="$out${out:+,}${T_NAMES[$i]}"
    done
    printf '%s' "$out"
}

# Known names grouped by link generation, one group per line, each line prefixed with $1.
names_by_family() {
    local layout
    for layout in A B C; do
        printf '%s%s:\n' "$1" "$(layout_title $layout)"
        layout_names $layout | awk -v ind="$1    " 'BEGIN { RS = "," }
            { if (len && len + length($0) + 2 > 96) { printf ",\n"; len = 0 }
              if (len == 0) { printf "%s%s", ind, $0; len = length(ind) + length($0) }
              else { printf ", %s", $0; len += length($0) + 2 } }
            END { printf "\n" }'
    done
}

# Indexes (space-separated) of the table rows whose names or folder match $1, or return 1.
rows_named() {
    local wanted i out=''
    wanted=$(to_lower "$1")
    case $wanted in '' | *,*) return 1 ;; esac
    for i in "${!T_KEYS[@]}"; do
        case ${T_KEYS[$i]} in *",$wanted,"*) out="$out $i" ;; esac
    done
    [ -n "$out" ] && printf '%s' "${out# }"
}

# The model id a name stands for (all its rows are candidate layouts), or return 1.
model_of() {
    local rows
    rows=$(rows_named "$1") || return 1
    printf '%s' "${T_MODEL[${rows%% *}]}"
}

# The table row of model $1 in layout $2, or return 1.
row_of() {
    local i
    for i in "${!T_MODEL[@]}"; do
        [ "${T_MODEL[$i]}" = "$1" ] && [ "${T_LAYOUT[$i]}" = "$2" ] && { printf '%s' "$i"; return 0; }
    done
    return 1
}

# If $1 names a model this library cannot run, prints "what it is|instead" and returns 0.
unsupported() {
    local i wanted
    wanted=$(to_lower "$1")
    for i in "${!U_NAMES[@]}"; do
        case ,$(to_lower "${U_NAMES[$i]}"), in *",$wanted,"*)
            printf '%s|%s' "${U_WHAT[$i]}" "${U_INSTEAD[$i]}"
            return 0 ;;
        esac
    done
    # Names not in the table but plainly of these kinds.
    case $wanted in
        *vision*) printf 'a vision model|the text models listed by --help' ;;
        *int4* | *qlora* | *spinquant*) printf 'an INT4 quantized model|its bf16 version (listed by --help)' ;;
        *int8*) printf 'an INT8 model|its bf16 version (listed by --help)' ;;
        *) return 1 ;;
    esac
}

# ---- the signed URL -----------------------------------------------------------------------
# Removes what copying adds to a URL (whitespace, line breaks, quotes); prints the result.
clean_url() {
    local url=$1 notes=() ws
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
        say "Note: cleaned up the URL you gave: $joined." >&2
    fi
    printf '%s' "$url"
}

# Cleans the URL and checks it; exits 2 if unusable. Sets URL, URL_PREFIX, URL_SUFFIX.
clean_and_check_url() {
    local url stars
    url=$(clean_url "$1")
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
  (check the model name: each link serves only the model family it was issued for).
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

# Picks MD5_TOOL and SHA_TOOL (checklists hold md5 or sha256; layout B records sha256).
pick_hashers() {
    local py=0
    have python3 && python3 -S -c 'import hashlib' >/dev/null 2>&1 && py=1
    MD5_TOOL='' SHA_TOOL=''
    if have md5sum; then MD5_TOOL=md5sum
    elif have md5 && [ "$(printf '' | md5 -r 2>/dev/null | cut -c1-32)" = d41d8cd98f00b204e9800998ecf8427e ]; then
        MD5_TOOL=md5
    elif [ $py = 1 ]; then MD5_TOOL=python3
    fi
    if have sha256sum; then SHA_TOOL=sha256sum
    elif have shasum && [ "$(printf '' | shasum -a 256 2>/dev/null | cut -c1-8)" = e3b0c442 ]; then
        SHA_TOOL=shasum
    elif [ $py = 1 ]; then SHA_TOOL=python3
    fi
    local missing=''
    [ -z "$MD5_TOOL" ] && missing='md5 (md5sum, md5 or python3)'
    [ -z "$SHA_TOOL" ] && missing="$missing${missing:+ and }sha256 (sha256sum, shasum or python3)"
    [ -z "$missing" ] && return 0
    die $EXIT_VERIFY "cannot verify downloads: no tool for $missing.
  Install coreutils (md5sum, sha256sum) or python3 and run this script again. Nothing was downloaded."
}

# Prints the ALGO (md5 | sha256) hash of FILE in lowercase hex.
hash_of() {
    local algo=$1 file=$2 tool
    [ "$algo" = md5 ] && tool=$MD5_TOOL || tool=$SHA_TOOL
    case $tool in
        md5sum) md5sum -- "$file" | cut -c1-32 ;;
        md5) md5 -r -- "$file" | cut -c1-32 ;;
        sha256sum) sha256sum -- "$file" | cut -c1-64 ;;
        shasum) shasum -a 256 -- "$file" | cut -c1-64 ;;
        python3)
            python3 -S - "$algo" "$file" <<'PY'
import hashlib, sys
h = hashlib.new(sys.argv[1])
with open(sys.argv[2], "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
print(h.hexdigest())
PY
            ;;
    esac
}

file_size() { wc -c <"$1" | tr -d ' '; }

# "SIZE MTIME" of a file (MTIME with sub-second digits where the system keeps them).
file_stamp() {
    stat -c '%s %.9Y' -- "$1" 2>/dev/null || stat -f '%z %Fm' -- "$1" 2>/dev/null ||
        python3 -S -c 'import os, sys; s = os.stat(sys.argv[1]); print(s.st_size, s.st_mtime_ns)' "$1"
}

# Cuts FILE to N bytes (a range that went wrong is thrown away, not kept as data).
truncate_to() { dd if=/dev/null of="$1" bs=1 seek="$2" count=0 2>/dev/null; }

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
    local url=$1 part=$2 rc
    DL_HTTP='' DL_TOOL='' DL_WHY=''
    if [ "$DOWNLOADER" = wget ]; then run_wget "$url" "$part"; else run_curl "$url" "$part"; fi
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

# wget's half of run_downloader: sets rc and DL_HTTP in the caller.
run_wget() {
    local url=$1 part=$2 progress=() log
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
}

# curl's half of run_downloader: sets rc and DL_HTTP in the caller.
run_curl() {
    local url=$1 part=$2 progress=()
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
}

# Downloads REMOTE to DEST (via DEST.part) unless DEST already exists. Returns 0 on success;
# otherwise sets FAIL (http403 | http404 | http | network | write | markup | norange | other).
# A shard over RANGE_LIMIT bytes is fetched as byte ranges (fetch_ranged).
fetch() {
    local remote=$1 dest=$2 part="$2.part" url total
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
    case $dest in
        */consolidated.*.pth)
            total=$(remote_size "$url")
            if [ -n "$total" ] && [ "$total" -gt "$RANGE_LIMIT" ]; then
                fetch_ranged "$remote" "$dest" "$url" "$total"
                return
            fi ;;
    esac
    fetch_plain "$remote" "$dest" "$url"
}

# One GET of URL to DEST.part (resuming), with retries; then checks for an error page.
fetch_plain() {
    local remote=$1 dest=$2 url=$3 part="$2.part" attempt=0
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
        esac
        fatal_failure "$remote" "$part" && return 1
        retry_or_give_up "$remote" "$part" || return 1
        attempt=$((attempt + 1))
        say "  retrying $dest in ${RETRY_WAIT}s (attempt $((attempt + 1)) of $((RETRIES + 1))), resuming from byte $(size_or_0 "$part")"
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

size_or_0() { if [ -f "$1" ]; then file_size "$1"; else printf 0; fi; }

# After a failed attempt (DL_KIND, DL_HTTP): returns 0 with FAIL set and the error printed if
# retrying cannot help (403, 404, other 4xx, write error, unknown), 1 if a retry may.
fatal_failure() {
    local remote=$1 part=$2
    case $DL_KIND in
        http)
            case $DL_HTTP in
                403) FAIL=http403; err "403 Forbidden for $remote"; return 0 ;;
                404) FAIL=http404
                    err "404 Not Found for $remote: the server has no such file.
  Check the model name (the link from Meta's e-mail only serves the models it was issued for)
  and that the URL was copied completely."
                    return 0 ;;
                5??) return 1 ;;
                *) FAIL=http; err "the server answered HTTP ${DL_HTTP:-error} for $remote."; return 0 ;;
            esac ;;
        write)
            FAIL='write'
            err "could not write $part (disk full or no permission?)."
            local avail; avail=$(free_kb "$(dirname "$part")")
            [ -n "$avail" ] && say "  Free space there: $((avail / 1024)) MiB." >&2
            say "  Free some space (or pick another --target) and run this script again: the download resumes." >&2
            return 0 ;;
        other) FAIL=other; err "downloading $remote failed (${DL_TOOL:-$DOWNLOADER} exit code $DL_RC)."; return 0 ;;
    esac
    return 1
}

# Returns 1 (FAIL=network, advice printed) once $attempt (the caller's) has used up the retries.
retry_or_give_up() {
    local remote=$1 part=$2
    [ "$attempt" -lt "$RETRIES" ] && return 0
    FAIL=network
    if [ "$DL_KIND" = http ]; then
        err "the server failed (HTTP $DL_HTTP) while sending $remote, $((RETRIES + 1)) times."
    else
        err "network failure while downloading $remote (${DL_TOOL:-$DOWNLOADER}: ${DL_WHY:-exit code $DL_RC}, $((RETRIES + 1)) attempts)."
    fi
    [ -s "$part" ] && say "  Kept the partial file ${part} ($(file_size "$part") bytes)." >&2
    say "  Check your connection and run this script again (same command, within the link's 24 hours):
  it resumes partial files and skips verified ones." >&2
    return 1
}

# The size in bytes of the file at URL, from a one-byte range request (Meta's CDN refuses
# HEAD); empty if unknown. Needs curl (wget cannot send a bounded Range header).
remote_size() {
    [ -n "$RANGE_TOOL" ] || return 0
    local hdr="$TMP_PREFIX.headers"
    LC_ALL=C curl --silent --location --range 0-0 --dump-header "$hdr" --output - -- "$1" 2>/dev/null |
        head -c 1 >/dev/null
    # A redirect writes several header blocks: the last one counts.
    sed -n 's/^[Cc]ontent-[Rr]ange: *bytes [0-9]*-[0-9]*\/\([0-9][0-9]*\).*/\1/p' "$hdr" 2>/dev/null | tail -n 1
    rm -f "$hdr"
}

# Fetches bytes FROM-TO of URL, appending them to PART, with curl. Sets DL_KIND, DL_HTTP,
# DL_RC, DL_WHY. A reply that is not exactly that range is cut off PART again.
run_range() {
    local url=$1 part=$2 from=$3 to=$4 hdr="$TMP_PREFIX.headers" progress=() got
    [ -t 2 ] || progress=(--silent --show-error)
    LC_ALL=C curl --location --fail --connect-timeout 30 --speed-limit 1 --speed-time 120 \
        ${progress[@]+"${progress[@]}"} --range "$from-$to" --dump-header "$hdr" --output - \
        -- "$url" >>"$part"
    DL_RC=$? DL_WHY='' DL_TOOL=curl
    DL_HTTP=$(sed -n 's/^HTTP\/[0-9.]* \([0-9][0-9][0-9]\).*/\1/p' "$hdr" 2>/dev/null | tail -n 1)
    case $DL_RC in
        0) DL_KIND=ok ;;
        22) DL_KIND=http ;;
        23) DL_KIND='write' ;;
        5 | 6 | 7 | 16 | 18 | 28 | 35 | 52 | 55 | 56 | 92) DL_KIND=network ;;
        *) DL_KIND=other ;;
    esac
    got=$(( $(size_or_0 "$part") - from ))
    if [ "$DL_KIND" = ok ] && [ "$DL_HTTP" != 206 ]; then
        truncate_to "$part" "$from"
        DL_KIND=norange
    elif [ "$got" -gt $((to - from + 1)) ]; then
        truncate_to "$part" "$from"
        DL_KIND=network DL_WHY="the server sent $got bytes for a range of $((to - from + 1))"
    elif [ "$DL_KIND" = ok ] && [ "$got" -ne $((to - from + 1)) ]; then
        DL_KIND=network DL_WHY="the range came back with $got bytes instead of $((to - from + 1))"
    fi
    rm -f "$hdr"
}

# Downloads a file of TOTAL bytes as ranges of at most RANGE_LIMIT bytes, appended in place to
# DEST.part: its size says where to go on, so a run resumes range by range (and within one).
fetch_ranged() {
    local remote=$1 dest=$2 url=$3 total=$4 part="$2.part" attempt=0 have from to n count
    count=$(( (total + RANGE_LIMIT - 1) / RANGE_LIMIT ))
    say "Downloading $dest ($total bytes) as $count byte ranges of at most $RANGE_LIMIT bytes, with curl"
    while have=$(size_or_0 "$part"); [ "$have" -lt "$total" ]; do
        n=$((have / RANGE_LIMIT)) from=$have
        to=$(( (n + 1) * RANGE_LIMIT - 1 ))
        [ "$to" -ge "$total" ] && to=$((total - 1))
        say "  range $((n + 1)) of $count: bytes $from-$to$([ "$from" -gt $((n * RANGE_LIMIT)) ] && echo ' (resuming)')"
        run_range "$url" "$part" "$from" "$to"
        if [ "$DL_KIND" = norange ]; then
            FAIL=norange
            err "the server ignored the Range header for $remote (HTTP ${DL_HTTP:-?}), so it cannot be fetched in pieces."
            return 1
        fi
        [ "$DL_KIND" = ok ] && { attempt=0; continue; }
        fatal_failure "$remote" "$part" && return 1
        retry_or_give_up "$remote" "$part" || return 1
        attempt=$((attempt + 1))
        say "  retrying range $((n + 1)) in ${RETRY_WAIT}s (attempt $((attempt + 1)) of $((RETRIES + 1))), resuming from byte $(size_or_0 "$part")${DL_WHY:+: $DL_WHY}"
        sleep "$RETRY_WAIT"
    done
    if [ "$(file_size "$part")" -ne "$total" ]; then
        FAIL=other
        err "$part has more bytes than the $total the server now reports for $remote: remove it and run this script again."
        return 1
    fi
    mv -f "$part" "$dest" || { FAIL='write'; err "could not rename $part to $dest."; return 1; }
}

# ---- verification -------------------------------------------------------------------------
# A checklist line shown to the user: quoted, control characters made visible.
quote_line() { printf "'%s'" "$(printf '%s' "$1" | cat -v)"; }

# True if a checklist names a file outside the model folder (or with control characters).
bad_name() {
    case $1 in '' | /* | .. | ../* | */.. | */../*) return 0 ;; esac
    [[ $1 == *[[:cntrl:]]* ]]
}

# Reads a checklist.chk into CK_ALGOS / CK_SUMS / CK_NAMES. Each line is "<hash>  <file>" (or
# "<hash> *<file>"): 32 hex digits is md5, 64 is sha256; a leading ./ is allowed. Returns 1 with
# CK_ERROR set (quoting the line) for anything else.
parse_checklist() {
    local line name n=0
    CK_ALGOS=() CK_SUMS=() CK_NAMES=() CK_ERROR=''
    while IFS= read -r line || [ -n "$line" ]; do
        line=${line%$'\r'}
        [ -z "$line" ] && continue
        n=$((n + 1))
        if ! [[ $line =~ ^([0-9a-fA-F]{32}|[0-9a-fA-F]{64})\ [\ *](.*)$ ]]; then
            CK_ERROR="line $n is not '<md5 or sha256>  <file>': $(quote_line "$line")"
            return 1
        fi
        name=${BASH_REMATCH[2]}
        name=${name#./}
        if bad_name "$name"; then
            CK_ERROR="line $n names a file outside the model folder (absolute, '..' or control characters), refused: $(quote_line "$line")"
            return 1
        fi
        CK_SUMS+=("$(to_lower "${BASH_REMATCH[1]}")") CK_NAMES+=("$name")
        if [ ${#BASH_REMATCH[1]} -eq 32 ]; then CK_ALGOS+=(md5); else CK_ALGOS+=(sha256); fi
    done <"$1"
    [ "$n" -gt 0 ] || { CK_ERROR='it is empty'; return 1; }
}

# Loads DIR's record of earlier verifications into M_* (ignored with --reverify).
load_marker() {
    local kind algo sum size mtime name
    M_KIND=() M_ALGO=() M_SUM=() M_STAMP=() M_NAME=() NEW_MARKER=()
    [ -f "$1/$VERIFIED_MARKER" ] || return 0
    while read -r kind algo sum size mtime name; do
        [ -n "$name" ] || continue
        M_KIND+=("$kind") M_ALGO+=("$algo") M_SUM+=("$sum") M_STAMP+=("$size $mtime") M_NAME+=("$name")
    done <"$1/$VERIFIED_MARKER"
}

# The index in M_* of the record for NAME of KIND, or return 1.
marker_entry() {
    local j
    for j in "${!M_NAME[@]}"; do
        [ "${M_NAME[$j]}" = "$1" ] && [ "${M_KIND[$j]}" = "$2" ] && { printf '%s' "$j"; return 0; }
    done
    return 1
}

save_marker() {
    local marker="$1/$VERIFIED_MARKER" content old=''
    if [ ${#NEW_MARKER[@]} -eq 0 ]; then rm -f "$marker"; return; fi
    content=$(printf '%s\n' "${NEW_MARKER[@]}")
    [ -f "$marker" ] && old=$(cat "$marker")
    [ "$content" = "$old" ] || printf '%s\n' "$content" >"$marker" 2>/dev/null || warn "could not write $marker"
}

# Renames a file that failed to NAME.bad and records it in BAD_FILES.
reject_file() {
    local dir=$1 name=$2 why=$3
    mv -f "$dir/$name" "$dir/$name.bad"
    err "$dir/$name $why. Renamed it to $name.bad; run this script again to download it again."
    BAD_FILES+=("$dir/$name ($why, renamed to $name.bad)")
}

# Checks one file against its checklist hash. A record of an earlier run is trusted only if the
# file's size and modification time are unchanged.
check_file() {
    local dir=$1 name=$2 algo=$3 sum=$4 stamp j changed=''
    if [ ! -f "$dir/$name" ]; then
        say "  $name: MISSING (not downloaded)"
        BAD_FILES+=("$dir/$name (missing)")
        return 1
    fi
    stamp=$(file_stamp "$dir/$name")
    if j=$(marker_entry "$name" checked) && [ "${M_ALGO[$j]} ${M_SUM[$j]}" = "$algo $sum" ]; then
        if [ "${M_STAMP[$j]}" = "$stamp" ] && [ "$REVERIFY" != 1 ]; then
            say "  $name: OK (verified by an earlier run; size and modification time unchanged)"
            NEW_MARKER+=("checked $algo $sum $stamp $name")
            return 0
        fi
        [ "${M_STAMP[$j]}" = "$stamp" ] || changed=' (changed since an earlier run verified it)'
    fi
    if [ "$(hash_of "$algo" "$dir/$name")" = "$sum" ]; then
        say "  $name: OK ($algo)"
        NEW_MARKER+=("checked $algo $sum $stamp $name")
        return 0
    fi
    say "  $name: FAILED $algo checksum$changed"
    reject_file "$dir" "$name" "does not match its $algo checksum$changed"
    return 1
}

# Verifies DIR against its checklist.chk (already parsed into CK_*). Appends to BAD_FILES.
verify_model() {
    local dir=$1; shift
    local name i covered failures=0
    for name in "$@"; do
        covered=0
        for i in "${!CK_NAMES[@]}"; do [ "${CK_NAMES[$i]}" = "$name" ] && covered=1; done
        [ $covered = 1 ] || warn "$dir/$name is not listed in $dir/checklist.chk, so it cannot be verified."
    done
    load_marker "$dir"
    say "Verifying $dir with checklist.chk (md5 with $MD5_TOOL, sha256 with $SHA_TOOL)"
    for i in "${!CK_NAMES[@]}"; do
        check_file "$dir" "${CK_NAMES[$i]}" "${CK_ALGOS[$i]}" "${CK_SUMS[$i]}" || failures=$((failures + 1))
    done
    save_marker "$dir"
    [ $failures -eq 0 ]
}

# Layout B has no checklist: records each file's sha256, size and time for later runs, and
# reports a file that differs from what an earlier run recorded.
record_model() {
    local dir=$1; shift
    local name stamp j sum failures=0
    load_marker "$dir"
    say "Recording $dir (sha256 with $SHA_TOOL)"
    for name in "$@"; do
        [ -f "$dir/$name" ] || { say "  $name: MISSING (not downloaded)"; BAD_FILES+=("$dir/$name (missing)"); failures=$((failures + 1)); continue; }
        stamp=$(file_stamp "$dir/$name")
        if j=$(marker_entry "$name" recorded) && [ "${M_STAMP[$j]}" = "$stamp" ] && [ "$REVERIFY" != 1 ]; then
            say "  $name: unchanged since an earlier run recorded it"
            NEW_MARKER+=("recorded sha256 ${M_SUM[$j]} $stamp $name")
            continue
        fi
        sum=$(hash_of sha256 "$dir/$name")
        if j=$(marker_entry "$name" recorded) && [ "${M_SUM[$j]}" != "$sum" ]; then
            say "  $name: CHANGED since an earlier run recorded it"
            reject_file "$dir" "$name" "differs from the sha256 recorded when it was downloaded"
            failures=$((failures + 1))
            continue
        fi
        say "  $name: recorded (sha256 $sum)"
        NEW_MARKER+=("recorded sha256 $sum $stamp $name")
    done
    save_marker "$dir"
    warn "the files of $dir could not be verified: $(layout_title B) come with no checksum list.
  Their sizes and sha256 are recorded in $dir/$VERIFIED_MARKER, so a later run (or --reverify)
  tells a file that changed since."
    NOT_VERIFIED+=("$dir")
    [ $failures -eq 0 ]
}
# shellcheck disable=SC2317,SC2329  # called by the trap
on_signal() {
    [ -n "$CURRENT_LOG" ] && rm -f "$CURRENT_LOG"
    [ -n "${TMP_PREFIX-}" ] && rm -f "$TMP_PREFIX.probe" "$TMP_PREFIX.headers"
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


# ---- the steps of a run -------------------------------------------------------------------
parse_args() {
    URL=${LLAMA_URL-} MODELS=${LLAMA_MODELS-} TARGET=${LLAMA_TARGET-} DOWNLOADER_WANTED=${LLAMA_DOWNLOADER-}
    URL_SET=${LLAMA_URL+1} MODELS_SET=${LLAMA_MODELS+1}
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
            -u | --url) URL=$val URL_SET=1 ;;
            -m | --models) MODELS=$val MODELS_SET=1 ;;
            -t | --target) TARGET=$val ;;
            --downloader) DOWNLOADER_WANTED=$val ;;
            --retries) RETRIES=$val ;;
            --retry-wait) RETRY_WAIT=$val ;;
            *) die $EXIT_BAD_INPUT "unknown argument '$opt' (see --help)." ;;
        esac
    done
    case $RETRIES in '' | *[!0-9]*) die $EXIT_BAD_INPUT "--retries must be a number (got '$RETRIES')." ;; esac
    case $RETRY_WAIT in '' | *[!0-9]*) die $EXIT_BAD_INPUT "--retry-wait must be a number of seconds (got '$RETRY_WAIT')." ;; esac
    case $RANGE_LIMIT in '' | 0 | *[!0-9]*) die $EXIT_BAD_INPUT "LLAMA_RANGE_LIMIT must be a number of bytes (got '$RANGE_LIMIT')." ;; esac
    [ -n "$TARGET" ] || TARGET=.
}

# The two questions of Meta's script, for whatever was not given.
ask_url_and_models() {
    local pending='' have_pending=0 more pieces=1 gap=1
    if [ -z "$URL_SET" ]; then
        ask "Enter the URL from email: " || die $EXIT_BAD_INPUT "no URL given (use --url URL or LLAMA_URL, or answer the prompt)."
        URL=$REPLY_LINE
        # A URL pasted with line breaks arrives as several lines at once: join the pieces.
        [ "${BASH_VERSINFO[0]}" -ge 4 ] && gap=0.3
        while IFS= read -r -t "$gap" more; do
            if looks_like_url_piece "$more"; then URL=$URL$more pieces=$((pieces + 1))
            else pending=$more have_pending=1; break
            fi
        done
        [ $pieces -gt 1 ] && say "Note: the URL arrived in $pieces lines (line breaks in the paste); joined them into one."
        echo
    fi
    clean_and_check_url "$URL"
    [ -n "$MODELS_SET" ] && return 0
    printf 'Known models (names are case-insensitive):\n%s\n' "$(names_by_family '  ')" >&2
    local prompt='Enter the list of models to download without spaces (8B,8B-instruct,70B,70B-instruct or a name above), or press Enter for all: '
    if [ $have_pending = 1 ]; then printf '%s%s\n' "$prompt" "$pending" >&2; MODELS=$pending
    elif ask "$prompt"; then MODELS=$REPLY_LINE
    else MODELS=''; say "(no answer: downloading all models of the link)"
    fi
}

# Names -> model ids in SELECTED (unknown and unsupported names refused before any download).
choose_models() {
    local item id s unknown=() refused=() info items=()
    SELECTED=() TYPED=() ALL=0
    MODELS=$(printf '%s' "$MODELS" | tr -d ' \t\r\n')
    case $(to_lower "$MODELS") in '' | all) ALL=1; return 0 ;; esac
    IFS=, read -r -a items <<<"$MODELS"
    for item in "${items[@]}"; do
        [ -z "$item" ] && continue
        if info=$(unsupported "$item"); then
            refused+=("  $item is ${info%%|*}, which this library cannot run; it can run instead: ${info#*|}.")
        elif id=$(model_of "$item"); then
            [ ${#SELECTED[@]} -eq 0 ] && FIRST_ROWS=$(rows_named "$item")
            for s in ${SELECTED[@]+"${SELECTED[@]}"}; do [ "$s" = "$id" ] && id=''; done
            [ -n "$id" ] && SELECTED+=("$id") TYPED+=("$item")
        else unknown+=("$item")
        fi
    done
    [ ${#refused[@]} -eq 0 ] || die $EXIT_BAD_INPUT "not downloading models this library cannot run. Nothing was downloaded.
$(printf '%s\n' "${refused[@]}")"
    [ ${#unknown[@]} -eq 0 ] || die $EXIT_BAD_INPUT "unknown model name(s): ${unknown[*]}. Nothing was downloaded.
  Known names (comma-separated, no spaces; empty for all):
$(names_by_family '    ')"
    [ ${#SELECTED[@]} -gt 0 ] || die $EXIT_BAD_INPUT "no model selected (see --help for the names)."
}

prepare_target() {
    pick_downloader "$DOWNLOADER_WANTED"
    pick_hashers
    RANGE_TOOL=''
    have curl && RANGE_TOOL=curl
    mkdir -p -- "$TARGET" 2>/dev/null || die $EXIT_BAD_INPUT "cannot create the target folder '$TARGET'."
    cd -- "$TARGET" || die $EXIT_BAD_INPUT "cannot enter the target folder '$TARGET'."
    [ -w . ] || die $EXIT_BAD_INPUT "the target folder '$TARGET' is not writable."
    TMP_PREFIX=".download-tmp.$$"
    trap on_signal INT TERM
}

# Asks for REMOTE/params.json once; sets DL_KIND / DL_HTTP. Nothing is kept.
probe() {
    run_downloader "$(url_for "$1/params.json")" "$TMP_PREFIX.probe" 2>/dev/null
    rm -f "$TMP_PREFIX.probe"
}

# Finds out which layout the link serves (LAYOUT) and the table rows to fetch (ROWS).
detect_layout() {
    local candidates=() row tried='' all403=1
    if [ $ALL = 1 ]; then candidates=("$(row_of 3-8b A)" "$(row_of 3.1-8b B)")
    else
        # The layout of the name typed first, then the model's other layouts.
        read -r -a candidates <<<"$FIRST_ROWS"
        for row in "${!T_MODEL[@]}"; do
            [ "${T_MODEL[$row]}" = "${SELECTED[0]}" ] && [[ " $FIRST_ROWS " != *" $row "* ]] && candidates+=("$row")
        done
    fi
    say "Finding out which layout the link serves (asking for params.json of ${T_FOLDER[${candidates[0]}]}):"
    LAYOUT=''
    for row in "${candidates[@]}"; do
        probe "${T_REMOTE[$row]}"
        local answer="HTTP ${DL_HTTP:-error}"
        [ "$DL_KIND" = ok ] && answer=found
        [ "$DL_KIND" = network ] && answer='no answer (network failure)'
        say "  ${T_REMOTE[$row]}/params.json (layout ${T_LAYOUT[$row]}): $answer"
        [ "$DL_KIND" = ok ] && { LAYOUT=${T_LAYOUT[$row]}; break; }
        [ "$DL_KIND" = network ] && die $EXIT_DOWNLOAD "network failure while asking the server ($DOWNLOADER exit code $DL_RC). Check your connection and run this script again."
        tried="$tried
    ${T_REMOTE[$row]}/params.json: ${DL_HTTP:-failed}"
        [ "$DL_HTTP" = 403 ] || all403=0
    done
    if [ -z "$LAYOUT" ]; then
        err "the link serves none of the paths tried for ${T_FOLDER[${candidates[0]}]}:$tried"
        [ $ALL = 1 ] && say "  For a llama CLI link (3.1, 3.2, 3.3, Llama Guard 3), name the models (see --help)." >&2
        [ $all403 = 1 ] && advice_403
        exit $EXIT_DOWNLOAD
    fi
    say "The link serves the layout of $(layout_title "$LAYOUT")."
    choose_rows
}

# ROWS: the table rows of the selected models (or all models) in LAYOUT.
choose_rows() {
    local row i
    ROWS=()
    if [ $ALL = 1 ]; then
        for row in "${!T_MODEL[@]}"; do [ "${T_LAYOUT[$row]}" = "$LAYOUT" ] && ROWS+=("$row"); done
        return 0
    fi
    for i in "${!SELECTED[@]}"; do
        row=$(row_of "${SELECTED[$i]}" "$LAYOUT") || die $EXIT_BAD_INPUT "${TYPED[$i]} is not served by $(layout_title "$LAYOUT"); nothing was downloaded.
  Known names of this layout: $(layout_names "$LAYOUT")."
        ROWS+=("$row")
    done
}

# Warns when free space looks too small; refuses shards that need byte ranges without curl.
check_space() {
    local need_gb=0 avail row
    for row in "${ROWS[@]}"; do
        [ -f "${T_FOLDER[$row]}/$VERIFIED_MARKER" ] || need_gb=$((need_gb + T_GB[row]))
        if [ -z "$RANGE_TOOL" ] && [ "${T_BYTES[$row]}" -gt "$RANGE_LIMIT" ]; then
            die $EXIT_DOWNLOAD "the shards of ${T_FOLDER[$row]} are ${T_BYTES[$row]} bytes, more than one request may ask for
  ($RANGE_LIMIT): they are fetched as byte ranges, which needs curl (wget cannot send a bounded
  Range header). Install curl and run this script again. Nothing was downloaded."
        fi
    done
    avail=$(free_kb .)
    if [ -n "$avail" ] && [ "$need_gb" -gt 0 ] && [ "$avail" -lt $((need_gb * 976562)) ]; then
        warn "the selected models need about $need_gb GB but only $((avail / 1048576)) GiB is free in '$TARGET'.
  The download will stop when the disk is full; free space or use --target on a bigger disk."
    fi
    say "Downloading into $(pwd) with $DOWNLOADER${RANGE_TOOL:+ (files over $RANGE_LIMIT bytes as byte ranges with curl: wget cannot send a bounded Range header)}; md5 with $MD5_TOOL, sha256 with $SHA_TOOL."
}

download_top_level() {
    local policy=${T_POLICY[${ROWS[0]}]} f
    [ "$policy" = - ] && return 0
    for f in LICENSE "$policy"; do
        fetch "$f" "$f" || { FAILED_DOWNLOADS+=("$f"); abort_if_fatal; }
    done
}

# Fetches one model (its checklist first, where the layout has one) and verifies it.
download_model() {
    local row=$1 dir=${T_FOLDER[$1]} remote=${T_REMOTE[$1]} shards=${T_SHARDS[$1]} files=() f n failed=0
    local what="$shards shard"
    [ "$shards" -gt 1 ] && what="${what}s"
    [ "${T_EXTRA[$row]}" = fp8 ] && what="$what + $shards fp8 scales"
    say ""
    say "== ${T_NAMES[$row]} -> $dir ($what)"
    mkdir -p -- "$dir" || { err "cannot create $dir"; exit $EXIT_DOWNLOAD; }
    if [ "$LAYOUT" != B ]; then
        # checklist.chk first: a bad one (error page, wrong link) is caught before the big files.
        fetch "$remote/checklist.chk" "$dir/checklist.chk" ||
            { FAILED_DOWNLOADS+=("$dir/checklist.chk"); abort_if_fatal; say "  skipping the rest of $dir"; return; }
        checklist_usable "$dir" || return
    fi
    for ((n = 0; n < shards; n++)); do files+=("$(printf 'consolidated.%02d.pth' "$n")"); done
    if [ "${T_EXTRA[$row]}" = fp8 ]; then
        for ((n = 0; n < shards; n++)); do files+=("fp8_scales_$n.pt"); done
    fi
    for f in $MODEL_FILES; do files+=("$f"); done
    for f in "${files[@]}"; do
        fetch "$remote/$f" "$dir/$f" || { FAILED_DOWNLOADS+=("$dir/$f"); failed=1; abort_if_fatal; }
    done
    if [ "$LAYOUT" = B ]; then record_model "$dir" "${files[@]}" || failed=1
    else verify_model "$dir" "${files[@]}" || failed=1
    fi
    [ $failed = 0 ] && DONE_MODELS+=("$dir")
}

# Parses DIR/checklist.chk; a bad one is kept as checklist.chk.bad and the model skipped.
checklist_usable() {
    local dir=$1 why=''
    parse_checklist "$dir/checklist.chk" && return 0
    looks_like_markup "$dir/checklist.chk" && why=" It is an HTML/XML page$(markup_summary "$dir/checklist.chk")."
    mv -f "$dir/checklist.chk" "$dir/checklist.chk.bad"
    err "$dir/checklist.chk is not a usable checksum list: $CK_ERROR.$why
  Kept it as checklist.chk.bad; the link is probably wrong or expired. Skipping $dir."
    FAILED_DOWNLOADS+=("$dir/checklist.chk (not a usable checksum list)")
    return 1
}

report() {
    say ""
    [ ${#DONE_MODELS[@]} -gt 0 ] && say "Downloaded: ${DONE_MODELS[*]}"
    [ ${#NOT_VERIFIED[@]} -gt 0 ] && say "Not verified (the link has no checksum list; sha256 recorded): ${NOT_VERIFIED[*]}"
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

main() {
    load_tables
    parse_args "$@"
    ask_url_and_models
    choose_models
    prepare_target
    detect_layout
    check_space
    FAILED_DOWNLOADS=() BAD_FILES=() DONE_MODELS=() NOT_VERIFIED=()
    download_top_level
    local row
    for row in "${ROWS[@]}"; do download_model "$row"; done
    report
}

main "$@"
