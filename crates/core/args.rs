//! Command-line syntax (phase one: raw flags). `commands` resolves them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "imgstore",
    version,
    about = "Deduplicating, byte-exact backups of disk images",
    long_about = "imgstore backs up disk images (raw .img/.bin, .iso, block devices, dd streams) as \
content-defined chunks in a RocksDB store, deduplicated across every snapshot and image, and restores \
any snapshot byte-exact (checked against its BLAKE3 digest).",
    after_help = "Examples:\n  imgstore -r /backup/repo init\n  export IMGSTORE_REPO=/backup/repo\n  imgstore backup /var/lib/libvirt/images/vm.img --tag daily\n  imgstore snapshots\n  imgstore restore latest --name vm.img /tmp/vm-restored.img",
    after_long_help = "Examples:\n  imgstore -r /backup/repo init\n  export IMGSTORE_REPO=/backup/repo\n  imgstore backup /var/lib/libvirt/images/vm.img --tag daily\n  imgstore snapshots\n  imgstore restore latest --name vm.img /tmp/vm-restored.img\n\n\
Exit status:\n  0    success (diff: the snapshots are equal)\n  1    failure not listed below (diff: they differ)\n  2    bad arguments or usage (diff: trouble)\n  \
3    no repository at the path, or not an imgstore repository\n  4    repository busy: another writer holds the lock (see --wait)\n  \
5    damaged or wrong data found (check, verify, a restore that met damage)\n  6    snapshot not found, ambiguous, or several images and no --name\n  \
7    a server or bucket could not be reached, or refused the token or operation\n  \
8    a server's repository is not the one expected (plain although a key is given, or not the one recorded for its URL)\n  \
141  stdout closed by its reader (restore - | head)\n\n\
Names (--name) and tags: 1-128 letters, digits, '.', '_', '+', '-', starting with a letter, digit or '_'."
)]
pub struct Cli {
    /// Repository: a directory, or a server's URL (imgstores://HOST:PORT/).
    #[arg(
        short = 'r',
        long = "repo",
        env = "IMGSTORE_REPO",
        global = true,
        value_name = "PATH"
    )]
    pub repo: Option<PathBuf>,

    /// Never show a progress bar (it is shown only when stderr is a terminal).
    #[arg(long, global = true)]
    pub no_progress: bool,

    /// Print errors only (no summaries, notes or progress).
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,

    /// Say more: the parent chosen, what each step took.
    #[arg(short, long, global = true)]
    pub verbose: bool,

    /// When another writer holds the repository, wait for it (up to
    /// DURATION, 10m when given bare) instead of failing: backup, forget,
    /// gc, protect, unprotect, tag.
    #[arg(
        long,
        global = true,
        value_name = "DURATION",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "10m"
    )]
    pub wait: Option<String>,

    /// For a server repository: a file holding the token (IMGSTORE_TOKEN
    /// is read when this is not given; never pass a token as an argument).
    #[arg(long, global = true, env = "IMGSTORE_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// For a server repository: the SHA-256 fingerprint of its certificate
    /// (`imgstore server --fingerprint` prints it on the server).
    #[arg(
        long,
        global = true,
        env = "IMGSTORE_SERVER_FINGERPRINT",
        value_name = "SHA256:HEX"
    )]
    pub server_fingerprint: Option<String>,

    /// For a server repository: trust certificates signed by these CAs (PEM)
    /// instead of pinning a fingerprint.
    #[arg(long, global = true, env = "IMGSTORE_SERVER_CA", value_name = "FILE")]
    pub server_ca: Option<PathBuf>,

    /// For an encrypted repository: a key file (instead of a passphrase).
    #[arg(long, global = true, env = "IMGSTORE_KEY_FILE", value_name = "FILE")]
    pub key_file: Option<PathBuf>,

    /// For an encrypted repository: a file holding the passphrase
    /// (IMGSTORE_PASSWORD is read when no other source is given; else a
    /// prompt on the terminal).
    #[arg(
        long,
        global = true,
        env = "IMGSTORE_PASSWORD_FILE",
        value_name = "FILE"
    )]
    pub password_file: Option<PathBuf>,

    /// For an encrypted repository: a shell command printing the passphrase.
    #[arg(
        long,
        global = true,
        env = "IMGSTORE_PASSWORD_COMMAND",
        value_name = "COMMAND"
    )]
    pub password_command: Option<String>,

    /// For a server repository: how long to keep retrying requests while the
    /// server cannot be reached before giving up (the first one too: a
    /// command started while its server is down or restarting waits).
    #[arg(long, global = true, value_name = "DURATION", default_value = "2m")]
    pub retry_for: String,

    /// For a server or bucket-backed repository: most bytes per second
    /// sent to it (request bodies: chunk uploads, commits, bucket PUTs), to
    /// leave room on the link. RATE is a size per second (50M is 50 MiB/s;
    /// K, M, G: powers of 1024; "/s" optional) or bits per second (200Mbit,
    /// 1Gbit, 800kbit: powers of 1000).
    #[arg(
        long,
        global = true,
        env = "IMGSTORE_LIMIT_UPLOAD",
        value_name = "RATE"
    )]
    pub limit_upload: Option<String>,

    /// For a server or bucket-backed repository: most bytes per second
    /// received from it (answer bodies: restores, checks, bucket GETs);
    /// RATE as for --limit-upload.
    #[arg(
        long,
        global = true,
        env = "IMGSTORE_LIMIT_DOWNLOAD",
        value_name = "RATE"
    )]
    pub limit_download: Option<String>,

    /// For a server repository: accept the repository the server now
    /// answers with although it contradicts what this client recorded for
    /// the URL (another repository id, or plain where it was encrypted), and
    /// record it instead; only after replacing the repository on purpose.
    #[arg(long, global = true)]
    pub trust_new_repository: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a new repository.
    #[command(
        after_help = "Examples:\n  imgstore -r /backup/repo init\n  imgstore -r /backup/big-disks init --chunk-size 256K"
    )]
    Init(InitArgs),
    /// Back up a disk image, block device or stdin as a new snapshot.
    #[command(
        after_help = "Examples:\n  imgstore backup disk.img\n  imgstore backup /dev/vg0/vm-root --name vm-root --tag daily\n  dd if=/dev/sdb bs=4M | imgstore backup - --name sdb\n  imgstore backup disk.img --json\n  \
imgstore backup /dev/vg0/vm --base latest --changed dirty-ranges.txt --verify-unchanged 1%\n  \
imgstore backup /var/lib/libvirt/images/web01.qcow2 --bitmap imgstore   # stopped VM: only what changed\n  \
imgstore backup 'nbd+unix:///vda?socket=/var/lib/libvirt/qemu/web01-backup.sock' --name web01 --bitmap ckpt-1 --checkpoint ckpt-2"
    )]
    Backup(BackupArgs),
    /// List snapshots.
    #[command(
        after_help = "Examples:\n  imgstore snapshots\n  imgstore snapshots --name vm-root\n  imgstore snapshots --json | jq '.[0].id'"
    )]
    Snapshots(SnapshotsArgs),
    /// Restore a snapshot to a file, a block device or stdout.
    #[command(
        after_help = "SNAPSHOT is a full id, a unique id prefix, or `latest`; with --at TIME it may be \
omitted.\n\nExamples:\n  imgstore restore 1a2b3c4d restored.img\n  imgstore restore latest --name vm-root /dev/vg0/vm-root\n  \
imgstore restore --at '2026-11-01 03:00' --name vm-root old.img\n  imgstore restore latest - | sha256sum\n  \
imgstore restore latest --name vm-root /dev/vg0/vm-root --force --live --socket /run/vm-root.sock"
    )]
    Restore(RestoreArgs),
    /// Remove snapshots, by id or by a retention policy (per --name group).
    #[command(
        after_help = "A snapshot kept by any rule is kept; the newest in each bucket (UTC hour, day, \
ISO week, month, year) is the one kept, as in restic.\n\nExamples:\n  imgstore forget 1a2b3c4d\n  \
imgstore forget --keep-daily 7 --keep-weekly 4 --keep-monthly 12 --dry-run\n  imgstore forget --name vm-root --keep-last 3 --prune"
    )]
    Forget(ForgetArgs),
    /// Delete every chunk no snapshot references and give the space back.
    #[command(after_help = "Examples:\n  imgstore gc --dry-run\n  imgstore gc --json")]
    Gc(GcArgs),
    /// Protect a snapshot from `forget`.
    #[command(
        after_help = "Examples:\n  imgstore protect 1a2b3c4d\n  imgstore protect latest --name vm-root"
    )]
    Protect(IdArg),
    /// Allow `forget` to remove a protected snapshot again.
    #[command(after_help = "Example:\n  imgstore unprotect 1a2b3c4d")]
    Unprotect(IdArg),
    /// Add, remove or replace the tags of snapshots (their ids change: a
    /// snapshot's id is the hash of its record).
    #[command(
        after_help = "Examples:\n  imgstore tag latest --name vm-root --add pre-upgrade\n  imgstore tag 1a2b3c4d --remove daily\n  imgstore tag 1a2b3c4d --set monthly"
    )]
    Tag(TagArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(
        after_help = "Examples:\n  imgstore completions bash > /etc/bash_completion.d/imgstore\n  imgstore completions zsh > \"${fpath[1]}/_imgstore\"\n  imgstore completions fish > ~/.config/fish/completions/imgstore.fish"
    )]
    Completions(CompletionsArgs),
    /// Write man pages: imgstore(1) to stdout, or one per command into DIR.
    #[command(
        after_help = "Examples:\n  imgstore man | man -l -\n  imgstore man --dir /usr/local/share/man/man1"
    )]
    Man(ManArgs),
    /// Sizes and ratios of the repository or of one snapshot.
    #[command(
        after_help = "Examples:\n  imgstore stats\n  imgstore stats latest --name vm-root --json"
    )]
    Stats(StatsArgs),
    /// Verify the repository: structure and reference counts, optionally every chunk's data.
    #[command(
        after_help = "Exit status 0 only when no problem was found. Damaged objects are marked so \
that the next backup of the same data repairs them.\n\nExamples:\n  imgstore check\n  \
imgstore check --read-data\n  imgstore check --read-data-subset 10% --json"
    )]
    Check(CheckArgs),
    /// Serve snapshots as read-only NBD exports (nbdinfo, nbdcopy, qemu-img, nbd-client).
    #[command(
        after_help = "Export names: a full snapshot id, a unique prefix, or NAME@latest; with one \
export, the default (empty) name works too.\n\nExamples:\n  imgstore serve latest --name vm-root\n  \
imgstore serve --all --socket /run/imgstore.sock\n  \
imgstore serve latest --name vm-root --writable /var/tmp/vm-overlay   # boot or repair, then:\n  \
imgstore backup --from-export /var/tmp/vm-overlay --tag repaired\n  nbdinfo --map nbd://127.0.0.1/vm-root@latest\n  \
qemu-img convert -O qcow2 nbd://127.0.0.1/vm-root@latest vm.qcow2"
    )]
    Serve(ServeArgs),
    /// Mount snapshots as image files in a read-only FUSE file system.
    #[command(after_help = "Examples:\n  imgstore mount /mnt/snapshots\n  \
mount -o ro,loop /mnt/snapshots/by-name/vm-root/2026-11-25T03:00:00Z.img /mnt/vm\n  fusermount3 -u /mnt/snapshots")]
    Mount(MountArgs),
    /// Byte ranges that differ between two snapshots (from their recipes; reads no data).
    #[command(
        after_help = "The text output is `OFFSET LENGTH` lines (with `#` comments), usable as \
`backup --changed` input.\n\nExamples:\n  imgstore diff 1a2b3c4d 5e6f7a8b\n  imgstore diff 1a2b3c4d latest --name vm-root --json"
    )]
    Diff(DiffArgs),
    /// Prove snapshots restorable: rebuild them in memory and compare their digests.
    #[command(
        after_help = "Examples:\n  imgstore verify latest --name vm-root\n  imgstore verify --all --json"
    )]
    Verify(VerifyArgs),
    /// Copy snapshots from another repository (a directory or a server) into this one.
    #[command(
        after_help = "Only what this repository lacks is sent: regions it holds cost one lookup, \
chunks it holds are not sent. Every chunk copied is checked against its id first, so damage is never \
copied. Snapshots keep their ids; ones already here are skipped, so running the same copy again \
(a nightly sync) sends only new snapshots. Protection marks are not copied.\n\nExamples:\n  \
imgstore -r imgstores://backup.example:8420/ copy --from /var/backups/imgstore\n  \
imgstore -r imgstores://backup.example:8420/ copy --from /var/backups/imgstore latest --name web01-root\n  \
imgstore -r /var/restore-repo copy --from imgstores://backup.example:8420/ --from-token-file /root/ops.token \\\n      \
--from-server-fingerprint SHA256:... --name web01-root"
    )]
    Copy(CopyArgs),
    /// List, add, remove or change the key slots of an encrypted repository.
    #[command(
        after_help = "Every command below first needs an existing key (passphrase or --key-file).\n\nExamples:\n  \
imgstore key list\n  IMGSTORE_NEW_PASSWORD=... imgstore key add\n  imgstore key add --new-key-file /root/recovery.key\n  \
imgstore key passwd 1a2b3c4d\n  imgstore key remove 1a2b3c4d"
    )]
    Key(KeyArgs),
    /// Rebuild a bucket-backed repository's local directory (-r DIR, new)
    /// from the bucket alone: after losing the machine, or to use the
    /// repository from another one.
    #[command(
        after_help = "Reads the config, every pack's trailer, every record's copy and every snapshot object; recounts references from the snapshots down. The new directory then works like the lost one (`imgstore check --read-data` verifies everything).

Examples:
  AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... imgstore -r /var/lib/imgstore recover s3://backups/imgstore \\
      --endpoint https://s3.example.net --region eu-1"
    )]
    Recover(RecoverArgs),
    /// Serve this repository (-r DIR) to other hosts over HTTPS.
    #[command(
        after_help = "The server is the repository's one writer: any number of hosts back up, restore, \
check and gc at once. TLS is on by default with a certificate generated into DIR/server/tls at first \
start; clients pin its fingerprint. Tokens (`imgstore token add`) carry a role and namespaces; the \
config file (TOML) names namespaces and listen address.\n\nExamples:\n  imgstore -r /srv/imgstore server\n  \
imgstore -r /srv/imgstore server --fingerprint\n  imgstore -r /srv/imgstore server --config /etc/imgstore/server.toml\n\n\
Clients:\n  export IMGSTORE_TOKEN_FILE=/etc/imgstore/token IMGSTORE_SERVER_FINGERPRINT=SHA256:...\n  \
imgstore -r imgstores://backup.example:8420/ backup /dev/vg0/web01-root --name web01-root"
    )]
    Server(ServerArgs),
    /// Manage the tokens of this repository's server (-r DIR, on the server).
    #[command(
        after_help = "Examples:\n  imgstore -r /srv/imgstore token add web01 --role backup --namespace web01\n  \
imgstore -r /srv/imgstore token add ops --role admin --output /root/ops.token\n  imgstore -r /srv/imgstore token list\n  \
imgstore -r /srv/imgstore token remove web01"
    )]
    Token(TokenArgs),
}

#[derive(Args, Debug)]
pub struct CopyArgs {
    /// The repository to copy from: a directory or imgstores://HOST:PORT/.
    #[arg(long, value_name = "REPO")]
    pub from: PathBuf,
    /// Snapshots to copy (ids, prefixes, `latest`); none: every snapshot
    /// (of --name's image when given).
    pub snapshots: Vec<String>,
    /// Only snapshots of this image.
    #[arg(long)]
    pub name: Option<String>,
    /// For a server source: a file holding its token (else IMGSTORE_FROM_TOKEN).
    #[arg(long, env = "IMGSTORE_FROM_TOKEN_FILE", value_name = "FILE")]
    pub from_token_file: Option<PathBuf>,
    /// For a server source: its certificate's SHA-256 fingerprint.
    #[arg(
        long,
        env = "IMGSTORE_FROM_SERVER_FINGERPRINT",
        value_name = "SHA256:HEX"
    )]
    pub from_server_fingerprint: Option<String>,
    /// For a server source: trust certificates signed by these CAs.
    #[arg(long, value_name = "FILE")]
    pub from_server_ca: Option<PathBuf>,
    /// Print one JSON object per snapshot (an array).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct KeyArgs {
    #[command(subcommand)]
    pub action: KeyAction,
}

#[derive(Subcommand, Debug)]
pub enum KeyAction {
    /// The key slots (ids, kinds, creation times; never secrets).
    List,
    /// A new slot: a passphrase (IMGSTORE_NEW_PASSWORD or a prompt), or a
    /// new random key file.
    Add {
        /// Create this key file (mode 0600) and add a slot for it.
        #[arg(long, value_name = "FILE")]
        new_key_file: Option<PathBuf>,
    },
    /// Remove a slot (never the last).
    Remove { id: String },
    /// A new passphrase for a slot (IMGSTORE_NEW_PASSWORD or a prompt).
    Passwd { id: String },
}

#[derive(Args, Debug)]
pub struct ServerArgs {
    /// Config file (TOML); default DIR/server/config.toml when it exists.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on (overrides the config; default 0.0.0.0:8420).
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<String>,
    /// Print the certificate's fingerprint (creating the certificate if
    /// needed) and exit.
    #[arg(long)]
    pub fingerprint: bool,
    /// Plain HTTP without TLS: only on a loopback address, for tests of the
    /// protocol itself.
    #[arg(long)]
    pub insecure_no_tls: bool,
    /// Log format on stderr.
    #[arg(long, value_parser = ["json", "text"], default_value = "json")]
    pub log_format: String,
}

#[derive(Args, Debug)]
pub struct TokenArgs {
    #[command(subcommand)]
    pub action: TokenAction,
    /// The token file (default: the config's `tokens`, else DIR/server/tokens.json).
    #[arg(long, value_name = "FILE", global = true)]
    pub tokens: Option<PathBuf>,
    /// The server config, to find the token file and check namespaces.
    #[arg(long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum TokenAction {
    /// Create a token and print it once (stdout, or --output FILE).
    Add {
        /// A name for the token (the host or person it is for).
        name: String,
        /// backup (append-only), restore (read) or admin (everything).
        #[arg(long, value_parser = ["backup", "restore", "admin"])]
        role: String,
        /// Namespaces the token may use (from the server config's namespaces table); repeatable.
        #[arg(long = "namespace", value_name = "NS")]
        namespaces: Vec<String>,
        /// Write the token to FILE (mode 0600) instead of stdout.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// List tokens (names, roles, namespaces; never secrets).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a token: the server refuses it from its next request.
    Remove { name: String },
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Also read, decompress and re-hash every stored chunk.
    #[arg(long, conflicts_with = "read_data_subset")]
    pub read_data: bool,
    /// Read a random sample of the chunks: a percentage ("10%") or a fraction ("0.1").
    #[arg(long, value_name = "N%")]
    pub read_data_subset: Option<String>,
    /// An encrypted repository, checked without its key (on its server or
    /// a host of a copy): every record against its id, the reference graph
    /// from the clear child ids, counts and orphans; with --read-data also
    /// every stored chunk's ciphertext (RocksDB's checksums locally, the
    /// pack's entry hashes in a bucket). Damage is named by object, not by
    /// snapshot byte ranges.
    #[arg(long, conflicts_with = "read_data_subset")]
    pub without_key: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct MountArgs {
    /// An existing empty directory.
    pub mountpoint: std::path::PathBuf,
    /// Snapshots to show (ids, prefixes or `latest`); all when omitted.
    pub snapshots: Vec<String>,
    /// With `latest`: the image name.
    #[arg(long)]
    pub name: Option<String>,
    /// Decompressed-chunk cache, shared among the images.
    #[arg(long, value_name = "SIZE", default_value = "64M")]
    pub cache: String,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Snapshots to export (ids, prefixes or `latest`).
    pub snapshots: Vec<String>,
    /// Export every snapshot.
    #[arg(long, conflicts_with = "snapshots")]
    pub all: bool,
    /// With `latest`: the image name.
    #[arg(long)]
    pub name: Option<String>,
    /// TCP address to listen on (loopback by default).
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:10809")]
    pub listen: String,
    /// Listen on a Unix socket instead of TCP.
    #[arg(long, value_name = "PATH", conflicts_with = "listen")]
    pub socket: Option<std::path::PathBuf>,
    /// Decompressed-chunk cache, shared among the exports.
    #[arg(long, value_name = "SIZE", default_value = "64M")]
    pub cache: String,
    /// Accept writes into a copy-on-write overlay in DIR (created, or resumed); the store is never written.
    #[arg(long, value_name = "DIR")]
    pub writable: Option<std::path::PathBuf>,
}

#[derive(Args, Debug)]
pub struct DiffArgs {
    /// The older snapshot (id, prefix or `latest`).
    pub a: String,
    /// The newer snapshot.
    pub b: String,
    /// With `latest`: the image name.
    #[arg(long)]
    pub name: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Snapshots (ids, unique prefixes or `latest`).
    pub snapshots: Vec<String>,
    /// Every snapshot in the repository.
    #[arg(long, conflicts_with = "snapshots")]
    pub all: bool,
    /// With `latest`: the image name.
    #[arg(long)]
    pub name: Option<String>,
    /// Print a JSON array, one object per snapshot.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ForgetArgs {
    /// Snapshots to remove (ids or unique prefixes); omit to apply --keep-* rules.
    pub snapshots: Vec<String>,
    /// Apply the policy only to snapshots with this name.
    #[arg(long)]
    pub name: Option<String>,
    /// Apply the policy only to snapshots taken on this host (repeatable: any of them).
    #[arg(long, value_name = "HOST")]
    pub host: Vec<String>,
    /// Apply the policy only to snapshots carrying this tag (repeatable: all of them).
    #[arg(long, value_name = "TAG")]
    pub tag: Vec<String>,
    /// Keep the N newest snapshots.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_last: usize,
    /// Keep the newest snapshot of each of the last N hours.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_hourly: usize,
    /// Keep the newest snapshot of each of the last N days.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_daily: usize,
    /// Keep the newest snapshot of each of the last N ISO weeks.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_weekly: usize,
    /// Keep the newest snapshot of each of the last N months.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_monthly: usize,
    /// Keep the newest snapshot of each of the last N years.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_yearly: usize,
    /// Keep snapshots within DURATION of the newest one (e.g. 30d, 2w, 12h).
    #[arg(long, value_name = "DURATION")]
    pub keep_within: Option<String>,
    /// Keep snapshots with this tag (repeatable).
    #[arg(long, value_name = "TAG")]
    pub keep_tag: Vec<String>,
    /// Show what would be removed and why each kept one is kept; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Run `gc` afterwards.
    #[arg(long)]
    pub prune: bool,
    /// Print the decisions as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct GcArgs {
    /// Report what would be deleted; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct IdArg {
    /// Snapshot id, unique prefix, or `latest`.
    pub snapshot: String,
    /// With `latest`: the image name.
    #[arg(long)]
    pub name: Option<String>,
}

#[derive(Args, Debug)]
pub struct TagArgs {
    /// Snapshots (ids, prefixes or `latest`).
    #[arg(required = true)]
    pub snapshots: Vec<String>,
    /// With `latest`: the image name.
    #[arg(long)]
    pub name: Option<String>,
    /// Add this tag (repeatable).
    #[arg(long, value_name = "TAG")]
    pub add: Vec<String>,
    /// Remove this tag (repeatable).
    #[arg(long, value_name = "TAG")]
    pub remove: Vec<String>,
    /// Replace all tags by these (repeatable; `--set ''` is not allowed: use --remove).
    #[arg(long, value_name = "TAG")]
    pub set: Vec<String>,
}

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell.
    pub shell: clap_complete::Shell,
}

#[derive(Args, Debug)]
pub struct ManArgs {
    /// Write imgstore.1 and imgstore-COMMAND.1 into this directory.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<std::path::PathBuf>,
}

#[derive(Args, Debug)]
pub struct StatsArgs {
    /// A snapshot (id, prefix or `latest`); omit for the whole repository.
    pub snapshot: Option<String>,
    /// With `latest`: the image name.
    #[arg(long)]
    pub name: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Average chunk size (power of two, 4K..4M; min = AVG/4, max = 4 x AVG).
    #[arg(long, value_name = "AVG", default_value = "64K")]
    pub chunk_size: String,
    /// zstd compression level for new chunks (1..=19).
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub compression_level: i32,
    /// Encrypt everything stored (format 3): a random master key wrapped
    /// by the passphrase (or --key-file) given.
    #[arg(long)]
    pub encryption: bool,
    /// Keep the data in an S3-compatible bucket (format 4): s3://BUCKET[/PREFIX].
    /// This directory keeps the index and a cache; the bucket alone is
    /// enough to rebuild it (`imgstore recover`).
    #[arg(long, value_name = "URL")]
    pub storage: Option<String>,
    /// With --storage: target size of the pack objects (1M..256M).
    #[arg(long, value_name = "SIZE", default_value = "32M", requires = "storage")]
    pub pack_size: String,
    #[command(flatten)]
    pub bucket: BucketArgs,
}

/// Where an S3-compatible service is, and the local cache. Credentials come
/// from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN) or the
/// profile AWS_PROFILE in ~/.aws/credentials, never from the command line.
#[derive(Args, Debug)]
pub struct BucketArgs {
    /// The service's URL (default: AWS S3 for --region).
    #[arg(long, value_name = "URL", env = "AWS_ENDPOINT_URL")]
    pub endpoint: Option<String>,
    /// The bucket's region ("garage" for Garage, unless it says otherwise).
    #[arg(
        long,
        value_name = "REGION",
        env = "AWS_REGION",
        default_value = "us-east-1"
    )]
    pub region: String,
    /// Bytes of recently written packs kept in DIR/cache (0 keeps none).
    #[arg(long, value_name = "SIZE", default_value = "1G")]
    pub cache_size: String,
}

#[derive(Args, Debug)]
pub struct RecoverArgs {
    /// The bucket holding the repository: s3://BUCKET[/PREFIX].
    #[arg(value_name = "URL")]
    pub storage: String,
    #[command(flatten)]
    pub bucket: BucketArgs,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct BackupArgs {
    /// Image file (raw, or a VM format: qcow2, vmdk, vhdx, vdi, vpc, qed), block device, NBD URI (nbd://HOST:PORT/EXPORT, port 10809 when omitted; nbd+unix:///EXPORT?socket=PATH; over TLS nbds://HOST:PORT/EXPORT?tls-certificates=DIR), or - for stdin (omit with --from-export or --stdin-from-command).
    #[arg(required_unless_present_any = ["from_export", "stdin_from_command"])]
    pub source: Option<String>,
    /// The image's format instead of QEMU's probe (qcow2, vmdk, vhdx, vdi, vpc, qed, raw); `raw` reads the file as it is.
    #[arg(long, value_name = "FORMAT", conflicts_with_all = ["from_export", "stdin_from_command"])]
    pub format: Option<String>,
    /// Back up what COMMAND writes to its stdout; a non-zero exit status
    /// fails the backup (no snapshot). Needs --name.
    #[arg(long, requires = "name", conflicts_with_all = ["source", "from_export", "base"])]
    pub stdin_from_command: bool,
    /// The command for --stdin-from-command, after `--`.
    #[arg(last = true, value_name = "COMMAND", requires = "stdin_from_command")]
    pub command: Vec<String>,
    /// Keep a 0-byte image as a snapshot (an empty source is refused otherwise).
    #[arg(long)]
    pub allow_empty: bool,
    /// Back up the view of a `serve --writable DIR` overlay: its base snapshot plus what was written.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["source", "base", "changed"])]
    pub from_export: Option<std::path::PathBuf>,
    /// Name grouping snapshots of the same disk (default: SOURCE's file name; required for stdin).
    #[arg(long)]
    pub name: Option<String>,
    /// Tag the snapshot (repeatable).
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// With --json: also print a status line (JSON) about once a second while it runs.
    #[arg(long, requires = "json")]
    pub json_status: bool,
    /// Changed-block backup: take everything not listed in --changed from this snapshot.
    #[arg(long, value_name = "SNAPSHOT", requires = "changed")]
    pub base: Option<String>,
    /// File of `OFFSET LENGTH` lines (bytes; `#` comments; - for stdin) listing what changed since --base.
    #[arg(long, value_name = "RANGES", requires = "base")]
    pub changed: Option<String>,
    /// With --changed or --bitmap: read this share of the unchanged regions too and fail if they differ from the base.
    #[arg(long, value_name = "N%")]
    pub verify_unchanged: Option<String>,
    /// Read only the blocks QEMU dirty bitmap NAME marks written since the parent snapshot: an NBD export's `qemu:dirty-bitmap:NAME`, or, for a stopped qcow2 file, a persistent bitmap imgstore adds and rotates itself. A bitmap that does not belong to the parent means a full read, with a note.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["base", "changed", "from_export", "stdin_from_command"])]
    pub bitmap: Option<String>,
    /// NBD source: the bitmap that records the writes made from this backup on (e.g. a libvirt checkpoint's), which the next backup reads with --bitmap (default: --bitmap's NAME).
    #[arg(long, value_name = "NAME", conflicts_with_all = ["base", "changed", "from_export", "stdin_from_command"])]
    pub checkpoint: Option<String>,
    /// Take unchanged regions from this snapshot (default: the latest of the same name).
    #[arg(long, value_name = "SNAPSHOT", conflicts_with_all = ["no_parent", "base", "from_export"])]
    pub parent: Option<String>,
    /// Chunk and hash every region, even those equal to the latest snapshot's.
    #[arg(long)]
    pub no_parent: bool,
    /// Read the source with O_DIRECT: less CPU and no page-cache eviction, no readahead.
    #[arg(long)]
    pub direct_io: bool,
    /// To a server: neither start from nor keep the client's cache of it (the server's hello, this image's last snapshot and its index), in IMGSTORE_CACHE_DIR, else $XDG_CACHE_HOME/imgstore, else ~/.cache/imgstore.
    #[arg(long)]
    pub no_cache: bool,
}

#[derive(Args, Debug)]
pub struct SnapshotsArgs {
    /// Only snapshots with this name.
    #[arg(long)]
    pub name: Option<String>,
    /// Only snapshots taken on this host (repeatable: any of them).
    #[arg(long, value_name = "HOST")]
    pub host: Vec<String>,
    /// Only snapshots carrying this tag (repeatable: all of them).
    #[arg(long, value_name = "TAG")]
    pub tag: Vec<String>,
    /// Print a JSON array.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// Snapshot id, unique id prefix, or `latest` (omit with --at).
    #[arg(value_name = "SNAPSHOT")]
    pub first: String,
    /// Target: new file path, existing block device, or - for stdout.
    #[arg(value_name = "TARGET")]
    pub second: Option<String>,
    /// Restrict `latest` / --at to snapshots with this name.
    #[arg(long)]
    pub name: Option<String>,
    /// The newest snapshot taken at or before TIME, in UTC; a date means the end of that day ("2026-11-01" = up to 23:59:59), "2026-11-01 03:00" the end of that minute, "2026-11-01 03:00:00" that second.
    #[arg(long, value_name = "TIME")]
    pub at: Option<String>,
    /// Overwrite an existing regular file or block device (refused without it).
    #[arg(long)]
    pub force: bool,
    /// Write a new VM image in this format (qcow2, vmdk, vhdx, vdi, vpc, qed) through QEMU's block layer; zero extents stay unallocated. Default: raw. With --delta: the target's format, instead of QEMU's probe.
    #[arg(long, value_name = "FORMAT")]
    pub format: Option<String>,
    /// TARGET already holds a version of the image: write only the chunks that differ.
    #[arg(long)]
    pub delta: bool,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Instant recovery: serve the snapshot over NBD at once (writable) while it is restored into TARGET underneath; resumable with the same command.
    #[arg(long, conflicts_with_all = ["delta", "json"])]
    pub live: bool,
    /// With --live: TCP address to serve on (loopback by default).
    #[arg(
        long,
        value_name = "ADDR:PORT",
        default_value = "127.0.0.1:10809",
        requires = "live"
    )]
    pub listen: String,
    /// With --live: serve on a Unix socket instead of TCP.
    #[arg(
        long,
        value_name = "PATH",
        conflicts_with = "listen",
        requires = "live"
    )]
    pub socket: Option<std::path::PathBuf>,
    /// With --live: the state file recording which blocks of TARGET are restored (default: in IMGSTORE_STATE_DIR, keyed by TARGET's path).
    #[arg(long, value_name = "FILE", requires = "live")]
    pub state: Option<std::path::PathBuf>,
    /// With --live: a JSON status line on stdout about once a second.
    #[arg(long, requires = "live")]
    pub json_status: bool,
    /// With --live: decompressed-chunk cache for the client's reads.
    #[arg(long, value_name = "SIZE", default_value = "256M", requires = "live")]
    pub cache: String,
}
