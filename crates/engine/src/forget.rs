//! Retention: which snapshots to forget (the plan), then forgetting them
//! (the execution), as two steps so that `--dry-run` shows exactly what
//! the real run does and the CLI only renders the plan.

use std::collections::HashSet;

use imgstore_format::{Id, ObjectKind};
use imgstore_repo::{DamageMark, ForgetOutcome, RepoError, Repository, UnreadableSnapshot};

use crate::policy::{self, Decision, Policy};
use crate::{select, select_unreadable, EngineError, Selector, SnapshotFilter};

/// What to forget.
#[derive(Clone, Debug)]
pub enum ForgetRequest {
    /// These snapshots (ids, prefixes, `latest`).
    Snapshots(Vec<String>),
    /// Everything the retention policy does not keep.
    Policy(Policy),
}

/// The decision for every snapshot considered, in time order, and what
/// became of the snapshot records that cannot be read.
#[derive(Clone, Debug, Default)]
pub struct ForgetPlan {
    pub decisions: Vec<Decision>,
    /// Unreadable records the request named by id (or unique prefix):
    /// removed with the plan. Only a name picks one.
    pub unreadable_removed: Vec<UnreadableSnapshot>,
    /// Unreadable records the request did not name: kept. A policy never
    /// chooses one (its name and time are unknown), and never fails for it.
    pub unreadable_kept: Vec<UnreadableSnapshot>,
}

impl ForgetPlan {
    /// Ids the plan removes.
    pub fn remove(&self) -> Vec<Id> {
        self.decisions
            .iter()
            .filter(|d| !d.keep)
            .map(|d| d.id)
            .chain(self.unreadable_removed.iter().map(|u| u.id))
            .collect()
    }
}

/// Plans a forget over the snapshots `filter` matches (a policy applies per
/// image name; named snapshots are looked up among those of
/// `filter.name`). Protected snapshots are always kept by a policy and
/// refused when named. A record that cannot be read is never considered
/// by a policy; an id (or unique prefix) names it whatever the filter, so
/// that junk can be removed.
pub fn plan_forget(
    repo: &dyn Repository,
    request: &ForgetRequest,
    filter: &SnapshotFilter,
) -> Result<ForgetPlan, EngineError> {
    let name = filter.name.as_deref();
    let list = repo.list_snapshots()?;
    let snaps = &list.snapshots;
    let protected = repo.protected()?;
    let mut unreadable_removed: Vec<UnreadableSnapshot> = Vec::new();
    let decisions = match request {
        ForgetRequest::Policy(p) => {
            let group: Vec<_> = snaps
                .iter()
                .filter(|(_, s)| filter.matches(s))
                .cloned()
                .collect();
            policy::apply(&group, p, &protected)
        }
        ForgetRequest::Snapshots(named) => {
            let mut remove = HashSet::new();
            for s in named {
                let sel = Selector::parse(s)?;
                let id = match select_unreadable(&list, &sel, name)? {
                    Some(u) => {
                        if !unreadable_removed.contains(u) {
                            unreadable_removed.push(u.clone());
                        }
                        u.id
                    }
                    None => select(snaps, &sel, name)?.0,
                };
                if protected.contains(&id) {
                    return Err(RepoError::Protected { id }.into());
                }
                remove.insert(id);
            }
            let mut d: Vec<Decision> = snaps
                .iter()
                .filter(|(id, _)| remove.contains(id))
                .map(|(id, s)| Decision {
                    id: *id,
                    name: s.name.clone(),
                    time_ns: s.time_ns,
                    keep: false,
                    reasons: vec![],
                })
                .collect();
            d.sort_by_key(|d| (d.time_ns, d.id));
            d
        }
    };
    let unreadable_kept = list
        .unreadable
        .iter()
        .filter(|u| !unreadable_removed.contains(u))
        .cloned()
        .collect();
    Ok(ForgetPlan {
        decisions,
        unreadable_removed,
        unreadable_kept,
    })
}

/// Carries out a plan: its snapshots are removed at once (or none is, when
/// one became protected or vanished meanwhile).
pub fn forget(repo: &dyn Repository, plan: &ForgetPlan) -> Result<ForgetOutcome, EngineError> {
    let remove = plan.remove();
    if remove.is_empty() {
        return Ok(ForgetOutcome::default());
    }
    Ok(repo.forget(&remove)?)
}

/// Records what `check` or `verify` found: new damage marks (so the next
/// backup of the same data rewrites those objects) and the removal of marks
/// on objects found intact. Returns how many marks were new.
pub fn record_damage(
    repo: &dyn Repository,
    marks: &[DamageMark],
    intact: &[(ObjectKind, Id)],
) -> Result<usize, EngineError> {
    let known: HashSet<(ObjectKind, Id)> = repo
        .damage_marks()?
        .iter()
        .map(|m| (m.kind, m.id))
        .collect();
    let mut seen = HashSet::new();
    let new: Vec<DamageMark> = marks
        .iter()
        .filter(|m| !known.contains(&(m.kind, m.id)) && seen.insert((m.kind, m.id)))
        .cloned()
        .collect();
    if !new.is_empty() {
        repo.mark_damaged(&new)?;
    }
    if !intact.is_empty() {
        repo.clear_damaged(intact)?;
    }
    Ok(new.len())
}

/// Changes the tags of snapshot `id`: `set` replaces them all (when given),
/// then `add` and `remove` apply. Tags follow the name grammar. The record
/// is replaced (a snapshot's id is the hash of its record, so the id
/// changes); returns the new id, or the old one when nothing changed.
pub fn retag(
    repo: &dyn Repository,
    id: &Id,
    set: Option<&[String]>,
    add: &[String],
    remove: &[String],
) -> Result<Id, EngineError> {
    for t in set.unwrap_or(&[]).iter().chain(add).chain(remove) {
        crate::check_tag(t)?;
    }
    let list = repo.list_snapshots()?;
    if let Some(u) = list.unreadable(id) {
        return Err(u.error().into());
    }
    let (_, snap) = list
        .snapshots
        .iter()
        .find(|(i, _)| i == id)
        .ok_or(RepoError::NoSnapshot { id: *id })?;
    let mut tags: Vec<String> = set.map(<[String]>::to_vec).unwrap_or(snap.tags.clone());
    for t in add {
        if !tags.contains(t) {
            tags.push(t.clone());
        }
    }
    tags.retain(|t| !remove.contains(t));
    if tags == snap.tags {
        return Ok(*id);
    }
    let mut new = snap.clone();
    new.tags = tags;
    let (_, record) = repo.codec().store_record(
        imgstore_format::sealed::RecordKind::Snapshot,
        new.encode(),
        &new.pages,
    );
    Ok(repo.replace_snapshot(id, &record)?)
}
