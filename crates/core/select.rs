//! Which snapshots a command means: the `--name` it was given checked, the
//! repository's snapshots listed with unreadable records warned about, and
//! the ids, prefixes and `latest` the user typed resolved.

use imgstore_engine::Selector;
use imgstore_format::{Id, Snapshot};
use imgstore_repo::{Repository, SnapshotList};

use crate::exit;
use crate::output::warn_unreadable;
use crate::units::plural;

/// Checks a `--name` the user gave against the name grammar.
pub(crate) fn check_name(name: Option<&str>) -> anyhow::Result<()> {
    if let Some(n) = name {
        imgstore_engine::check_name(n)?;
    }
    Ok(())
}

/// The repository's snapshots: those that can be read, and those that
/// cannot, each of which is warned about on stderr and otherwise skipped.
pub(crate) fn list_snapshots(store: &dyn Repository) -> anyhow::Result<SnapshotList> {
    let list = store.list_snapshots()?;
    warn_unreadable(&list.unreadable);
    Ok(list)
}

/// The snapshots a command names (ids, prefixes, `latest`), or all of them
/// with `everything`; oldest first, each once.
pub(crate) fn chosen_snapshots(
    store: &dyn imgstore_repo::Repository,
    names: &[String],
    everything: bool,
    name: Option<&str>,
) -> anyhow::Result<Vec<(Id, Snapshot)>> {
    check_name(name)?;
    // Unreadable records are warned about once the choice is made, so an
    // error stays one line.
    let all = store.list_snapshots()?;
    let mut out = if everything {
        all.snapshots.clone()
    } else {
        names
            .iter()
            .map(|s| {
                Ok(imgstore_engine::select_listed(
                    &all,
                    &Selector::parse(s)?,
                    name,
                )?)
            })
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    out.sort_by_key(|(id, s)| (s.time_ns, *id));
    out.dedup_by_key(|(id, _)| *id);
    if out.is_empty() {
        return Err(exit::not_found(if all.unreadable.is_empty() {
            "the repository holds no snapshots".to_string()
        } else {
            format!(
                "the repository holds no readable snapshots ({} cannot be read: `imgstore check` reports them)",
                plural(all.unreadable.len() as u64, "snapshot record")
            )
        }));
    }
    warn_unreadable(&all.unreadable);
    Ok(out)
}
