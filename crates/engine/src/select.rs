//! Choosing a snapshot from what the user typed.

use imgstore_format::{Id, Snapshot};
use imgstore_repo::{SnapshotList, UnreadableSnapshot};

use crate::EngineError;

/// How a snapshot is named on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    /// A full id or a unique prefix of one.
    Id(String),
    /// The newest snapshot (of `name`, when given).
    Latest,
    /// The newest snapshot taken at or before this time (ns since the epoch).
    At(i64),
}

impl Selector {
    /// `latest`, or an id / id prefix.
    pub fn parse(s: &str) -> Result<Selector, EngineError> {
        if s == "latest" {
            return Ok(Selector::Latest);
        }
        Id::check_prefix(s).map_err(|e| {
            EngineError::Select(format!(
                "{e}: give a snapshot id (or a unique prefix), or `latest`"
            ))
        })?;
        Ok(Selector::Id(s.to_ascii_lowercase()))
    }
}

fn names(snaps: &[&(Id, Snapshot)]) -> Vec<String> {
    let mut n: Vec<String> = snaps.iter().map(|(_, s)| s.name.clone()).collect();
    n.sort();
    n.dedup();
    n
}

/// Picks one snapshot. `name` restricts the candidates to one image name.
pub fn select(
    snaps: &[(Id, Snapshot)],
    sel: &Selector,
    name: Option<&str>,
) -> Result<(Id, Snapshot), EngineError> {
    let cands: Vec<&(Id, Snapshot)> = snaps
        .iter()
        .filter(|(_, s)| name.is_none_or(|n| s.name == n))
        .collect();
    let none = |what: String| EngineError::Select(what);
    match sel {
        Selector::Id(prefix) => {
            let hits: Vec<&&(Id, Snapshot)> = cands
                .iter()
                .filter(|(id, _)| id.has_prefix(prefix))
                .collect();
            match hits.as_slice() {
                [one] => Ok((**one).clone()),
                [] => Err(none(format!(
                    "no snapshot {prefix} in the repository: list them with `imgstore snapshots`"
                ))),
                many => Err(none(format!(
                    "snapshot id {prefix} is ambiguous ({} match: {}): give more characters",
                    many.len(),
                    many.iter()
                        .take(5)
                        .map(|(id, _)| id.short())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))),
            }
        }
        Selector::Latest | Selector::At(_) => {
            if name.is_none() {
                let n = names(&cands);
                if n.len() > 1 {
                    return Err(none(format!(
                        "the repository holds snapshots of several images ({}): choose one with --name",
                        n.join(", ")
                    )));
                }
            }
            let limit = match sel {
                Selector::At(t) => *t,
                _ => i64::MAX,
            };
            cands
                .iter()
                .filter(|(_, s)| s.time_ns <= limit)
                .max_by_key(|(id, s)| (s.time_ns, *id))
                .map(|c| (*c).clone())
                .ok_or_else(|| match (sel, name) {
                    (Selector::At(_), _) => {
                        none("no snapshot was taken at or before that time".into())
                    }
                    (_, Some(n)) => none(format!("no snapshot named {n} in the repository")),
                    _ => none(
                        "the repository holds no snapshots yet: run `imgstore backup` first".into(),
                    ),
                })
        }
    }
}

/// The unreadable record `sel` names: an id or prefix that matches exactly
/// one unreadable record and no readable snapshot (of `name`, when given;
/// an unreadable record's name is unknown, so it is matched whatever
/// `name` is). `None` when `sel` is not an id or matches no unreadable
/// record; an error when it matches one and something else too.
pub fn select_unreadable<'a>(
    list: &'a SnapshotList,
    sel: &Selector,
    name: Option<&str>,
) -> Result<Option<&'a UnreadableSnapshot>, EngineError> {
    let Selector::Id(prefix) = sel else {
        return Ok(None);
    };
    let bad: Vec<&UnreadableSnapshot> = list
        .unreadable
        .iter()
        .filter(|u| u.id.has_prefix(prefix))
        .collect();
    if bad.is_empty() {
        return Ok(None);
    }
    let good: Vec<Id> = list
        .snapshots
        .iter()
        .filter(|(id, s)| name.is_none_or(|n| s.name == n) && id.has_prefix(prefix))
        .map(|(id, _)| *id)
        .collect();
    match (bad.as_slice(), good.len()) {
        ([one], 0) => Ok(Some(one)),
        _ => {
            let n = bad.len() + good.len();
            let all: Vec<String> = bad
                .iter()
                .map(|u| u.id)
                .chain(good)
                .take(5)
                .map(|id| id.short())
                .collect();
            Err(EngineError::Select(format!(
                "snapshot id {prefix} is ambiguous ({n} match: {}): give more characters",
                all.join(", ")
            )))
        }
    }
}

/// [`select`] over a listing: `latest` and times choose among the
/// readable snapshots; an id that names an unreadable record is an error
/// saying so (not "no such snapshot"), and a failed choice says how many
/// records could not be read.
pub fn select_listed(
    list: &SnapshotList,
    sel: &Selector,
    name: Option<&str>,
) -> Result<(Id, Snapshot), EngineError> {
    if let Some(u) = select_unreadable(list, sel, name)? {
        return Err(u.error().into());
    }
    select(&list.snapshots, sel, name).map_err(|e| match (e, list.unreadable.len()) {
        (EngineError::Select(why), n) if n > 0 => EngineError::Select(format!(
            "{why} ({n} snapshot record{} cannot be read: `imgstore check` reports {})",
            if n == 1 { "" } else { "s" },
            if n == 1 { "it" } else { "them" }
        )),
        (e, _) => e,
    })
}

/// Which snapshots a listing or a retention policy considers: all given
/// criteria must hold (a snapshot must carry every tag given; any of the
/// hosts given).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotFilter {
    pub name: Option<String>,
    pub hosts: Vec<String>,
    pub tags: Vec<String>,
}

impl SnapshotFilter {
    pub fn matches(&self, s: &Snapshot) -> bool {
        self.name.as_deref().is_none_or(|n| s.name == n)
            && (self.hosts.is_empty() || self.hosts.contains(&s.hostname))
            && self.tags.iter().all(|t| s.tags.contains(t))
    }
}

/// How a backup chooses its parent (the snapshot whose unchanged regions
/// it reuses without chunking them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParentChoice {
    /// The newest snapshot of the same name, when there is one.
    Latest,
    /// What the user named (`--parent`): looked up among snapshots of the
    /// same name first, then among all.
    Named(String),
    /// None (`--no-parent`): every region is chunked.
    None,
}

/// Picks the snapshot named `what` for a backup of image `name`: among
/// snapshots of that name first (so `latest` means its newest), then among
/// all (an id of another image's snapshot is allowed).
pub fn select_for_image(
    snaps: &[(Id, Snapshot)],
    what: &str,
    name: &str,
) -> Result<(Id, Snapshot), EngineError> {
    let sel = Selector::parse(what)?;
    select(snaps, &sel, Some(name)).or_else(|_| select(snaps, &sel, None))
}

/// The parent of a backup of image `name`.
pub fn parent_for(
    snaps: &[(Id, Snapshot)],
    name: &str,
    choice: &ParentChoice,
) -> Result<Option<(Id, Snapshot)>, EngineError> {
    match choice {
        ParentChoice::None => Ok(None),
        ParentChoice::Latest => Ok(select(snaps, &Selector::Latest, Some(name)).ok()),
        ParentChoice::Named(p) => select_for_image(snaps, p, name)
            .map(Some)
            .map_err(|e| EngineError::Select(format!("--parent {p}: {e}"))),
    }
}

/// Splits an export name as NBD clients send it: `NAME@latest` is the
/// newest snapshot of NAME; anything else an id or unique prefix.
pub fn parse_export_name(export: &str) -> Result<(Selector, Option<String>), EngineError> {
    match export.strip_suffix("@latest") {
        Some(name) if !name.is_empty() => Ok((Selector::Latest, Some(name.to_string()))),
        _ => Ok((Selector::parse(export)?, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgstore_format::SnapshotStats;

    fn snap(name: &str, t: i64) -> (Id, Snapshot) {
        let s = Snapshot {
            time_ns: t,
            name: name.into(),
            hostname: "h".into(),
            source: "s".into(),
            tags: vec![],
            size: 0,
            digest: [0; 32],
            region_size: 1 << 23,
            pages: vec![],
            stats: SnapshotStats::default(),
            bitmap: None,
        };
        (s.id(), s)
    }

    #[test]
    fn latest_at_and_prefixes() {
        let all = vec![snap("a", 10), snap("a", 20), snap("b", 15)];
        assert!(select(&all, &Selector::Latest, None).is_err());
        assert_eq!(
            select(&all, &Selector::Latest, Some("a"))
                .unwrap()
                .1
                .time_ns,
            20
        );
        assert_eq!(
            select(&all, &Selector::At(19), Some("a"))
                .unwrap()
                .1
                .time_ns,
            10
        );
        assert!(select(&all, &Selector::At(5), Some("a")).is_err());
        let full = all[2].0.to_hex();
        assert_eq!(
            select(&all, &Selector::parse(&full[..6]).unwrap(), None)
                .unwrap()
                .0,
            all[2].0
        );
        assert!(
            select(&all, &Selector::Id(String::new()), None).is_err(),
            "empty prefix matches all: ambiguous"
        );
        assert!(Selector::parse("xyz").is_err());
        assert!(
            select(&all, &Selector::Id("ffffffffffff".into()), None).is_err()
                || all.iter().any(|s| s.0.has_prefix("ffffffffffff"))
        );
    }

    #[test]
    fn parents_and_export_names() {
        let all = vec![snap("a", 10), snap("a", 20), snap("b", 15)];
        let latest_a = parent_for(&all, "a", &ParentChoice::Latest)
            .unwrap()
            .unwrap();
        assert_eq!(latest_a.1.time_ns, 20);
        assert!(parent_for(&all, "c", &ParentChoice::Latest)
            .unwrap()
            .is_none());
        assert!(parent_for(&all, "a", &ParentChoice::None)
            .unwrap()
            .is_none());
        // Another image's snapshot by id is allowed; `latest` is this image's.
        let b = all[2].0.to_hex();
        let named = parent_for(&all, "a", &ParentChoice::Named(b[..8].into())).unwrap();
        assert_eq!(named.unwrap().0, all[2].0);
        let latest = parent_for(&all, "b", &ParentChoice::Named("latest".into())).unwrap();
        assert_eq!(latest.unwrap().1.time_ns, 15);
        assert!(parent_for(&all, "a", &ParentChoice::Named("zz".into())).is_err());

        let (sel, name) = parse_export_name("a@latest").unwrap();
        assert_eq!((sel, name.as_deref()), (Selector::Latest, Some("a")));
        let (sel, name) = parse_export_name(&b[..10]).unwrap();
        assert_eq!((sel, name), (Selector::Id(b[..10].into()), None));
        assert!(parse_export_name("@latest").is_err());
        assert!(parse_export_name("not-hex").is_err());
    }
}
