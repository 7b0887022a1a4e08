//! Shell completions and man pages, generated from the clap definitions
//! (`clap_complete`, `clap_mangen`) so they never disagree with `--help`.

use std::io::Write;

use anyhow::Context;
use clap::CommandFactory;

use crate::args::{Cli, CompletionsArgs, ManArgs};

pub fn completions(a: CompletionsArgs) -> anyhow::Result<()> {
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(a.shell, &mut cmd, "imgstore", &mut out);
    crate::output::emit(&String::from_utf8_lossy(&out))
}

fn render(cmd: clap::Command) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd)
        .render(&mut out)
        .context("cannot render the man page")?;
    Ok(out)
}

pub fn man(a: ManArgs) -> anyhow::Result<()> {
    let cmd = Cli::command();
    let Some(dir) = a.dir else {
        return crate::output::emit(&String::from_utf8_lossy(&render(cmd)?));
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut pages = vec![("imgstore.1".to_string(), render(cmd.clone())?)];
    for sub in cmd.get_subcommands() {
        let name = format!("imgstore-{}", sub.get_name());
        let page = render(sub.clone().name(name.clone()))?;
        pages.push((format!("{name}.1"), page));
    }
    for (file, page) in &pages {
        let path = dir.join(file);
        std::fs::File::create(&path)
            .and_then(|mut f| f.write_all(page))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    crate::output::note(&format!(
        "wrote {} man pages to {}",
        pages.len(),
        dir.display()
    ));
    Ok(())
}
