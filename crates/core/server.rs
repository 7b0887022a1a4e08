//! `imgstore server` and `imgstore token`: the binary's side of serving a
//! repository (configuration, logging, the runtime); the serving itself is
//! `imgstore-server`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use imgstore_protocol::Role;
use imgstore_server::{ServerConfig, TokenFile};
use imgstore_store::{Mode, Store};

use crate::args::{ServerArgs, TokenAction, TokenArgs};
use crate::exit;
use crate::output::{emit, note};
use crate::settings::settings;

fn local_dir(repo: &Path, what: &str) -> anyhow::Result<()> {
    if crate::open::remote_url(repo).is_some() {
        return Err(exit::usage(format!(
            "`imgstore {what}` runs on the server, with -r naming the repository directory there"
        )));
    }
    Ok(())
}

fn load_config(repo: &Path, explicit: Option<&Path>) -> anyhow::Result<ServerConfig> {
    let default = repo.join("server").join("config.toml");
    match explicit {
        Some(p) => Ok(ServerConfig::load(p)?),
        None if default.exists() => Ok(ServerConfig::load(&default)?),
        None => Ok(ServerConfig::default()),
    }
}

pub fn server(repo: &Path, a: ServerArgs) -> anyhow::Result<()> {
    local_dir(repo, "server")?;
    let config = load_config(repo, a.config.as_deref())?;
    let tls_dir = imgstore_server::default_tls_dir(repo);
    if !repo.join(imgstore_format::CONFIG_FILE).exists() {
        // Opening gives the usual "not a repository" error and exit code.
        Store::open(repo, Mode::ReadOnly)?;
    }
    let tls = if a.insecure_no_tls {
        None
    } else {
        Some(imgstore_server::tls::load_or_create(
            &tls_dir,
            config.tls_cert.as_deref(),
            config.tls_key.as_deref(),
        )?)
    };
    if a.fingerprint {
        let Some((_, fp)) = tls else {
            return Err(exit::usage(
                "--fingerprint and --insecure-no-tls exclude each other",
            ));
        };
        return emit(&format!("{fp}\n"));
    }
    let listen = a
        .listen
        .clone()
        .or_else(|| config.listen.clone())
        .unwrap_or_else(|| format!("0.0.0.0:{}", imgstore_protocol::DEFAULT_PORT));
    let addr: std::net::SocketAddr = listen
        .parse()
        .map_err(|_| exit::usage(format!("--listen {listen} is not an ADDRESS:PORT")))?;
    if a.insecure_no_tls && !addr.ip().is_loopback() {
        return Err(exit::usage(
            "--insecure-no-tls is allowed only on a loopback address: tokens and data would cross the network in clear",
        ));
    }
    init_logging(&a.log_format);
    let store = Store::open_waiting(
        repo,
        Mode::Write {
            operation: "server",
        },
        settings().wait,
    )?;
    let app = imgstore_server::App::new(store, config)?;
    let adopted = app.adopt_unmarked()?;
    if adopted > 0 {
        note(&format!(
            "marked {adopted} objects of existing snapshots for their namespaces"
        ));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("imgstore-server")
        .build()
        .context("cannot start the server runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| imgstore_server::ServerError::Listen {
                addr: listen.clone(),
                source,
            })?;
        let bound = listener.local_addr().context("listening socket")?;
        let fp = tls.as_ref().map(|(_, fp)| fp.clone());
        // The one line for scripts and tests: where, and what to pin.
        emit(&format!(
            "listening on {bound}{}\n",
            fp.as_deref()
                .map(|f| format!(" fingerprint {f}"))
                .unwrap_or_default()
        ))?;
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("signal handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        imgstore_server::serve(app, listener, tls.map(|(c, _)| c), shutdown).await;
        anyhow::Ok(())
    })?;
    note("server stopped");
    Ok(())
}

fn init_logging(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("IMGSTORE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    if format == "json" {
        b.json().flatten_event(true).init();
    } else {
        b.init();
    }
}

fn tokens_path(repo: &Path, a: &TokenArgs) -> anyhow::Result<(PathBuf, ServerConfig)> {
    let config = load_config(repo, a.config.as_deref())?;
    let path = a
        .tokens
        .clone()
        .or_else(|| config.tokens.clone())
        .unwrap_or_else(|| imgstore_server::default_tokens_path(repo));
    Ok((path, config))
}

pub fn token(repo: &Path, a: TokenArgs) -> anyhow::Result<()> {
    local_dir(repo, "token")?;
    let (path, config) = tokens_path(repo, &a)?;
    let mut file = TokenFile::load(&path)?;
    match a.action {
        TokenAction::Add {
            name,
            role,
            namespaces,
            output,
        } => {
            let role = Role::parse(&role).expect("clap checked it");
            if role != Role::Admin && namespaces.is_empty() {
                return Err(exit::usage(
                    "a backup or restore token needs --namespace NS (a namespace of the server config)",
                ));
            }
            for ns in &namespaces {
                if !config.namespaces.contains_key(ns) {
                    return Err(exit::usage(format!(
                        "namespace {ns:?} is not in the server config's [namespaces]: add it there first (e.g. {ns} = [\"{ns}-*\"])"
                    )));
                }
            }
            let secret = file.add(&name, role, namespaces)?;
            if let Some(out) = &output {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(out)
                    .with_context(|| {
                        format!("cannot create {} (it must not exist)", out.display())
                    })?;
                f.write_all(format!("{secret}\n").as_bytes())
                    .and_then(|_| f.sync_all())
                    .with_context(|| format!("cannot write {}", out.display()))?;
            }
            file.save(&path)?;
            match output {
                Some(out) => note(&format!(
                    "token {name:?} ({}) written to {}",
                    role.as_str(),
                    out.display()
                )),
                None => {
                    emit(&format!("{secret}\n"))?;
                    note(&format!(
                        "token {name:?} ({}): shown once, store it now",
                        role.as_str()
                    ));
                }
            }
        }
        TokenAction::List { json } => {
            if json {
                let v: Vec<_> = file
                    .tokens
                    .iter()
                    .map(|t| serde_json::json!({"name": t.name, "role": t.role.as_str(), "namespaces": t.namespaces, "created": t.created}))
                    .collect();
                emit(&format!("{}\n", serde_json::Value::Array(v)))?;
            } else {
                let mut out = format!("{:<24} {:<8} NAMESPACES\n", "NAME", "ROLE");
                for t in &file.tokens {
                    out.push_str(&format!(
                        "{:<24} {:<8} {}\n",
                        t.name,
                        t.role.as_str(),
                        if t.role == Role::Admin {
                            "(all)".to_string()
                        } else {
                            t.namespaces.join(",")
                        }
                    ));
                }
                emit(&out)?;
            }
        }
        TokenAction::Remove { name } => {
            if !file.remove(&name) {
                return Err(exit::usage(format!(
                    "no token named {name:?} (`imgstore token list`)"
                )));
            }
            file.save(&path)?;
            note(&format!("token {name:?} removed"));
        }
    }
    Ok(())
}
