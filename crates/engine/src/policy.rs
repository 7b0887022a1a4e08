//! Retention policies: which snapshots `forget` keeps, with restic's
//! semantics. Snapshots are grouped by name; within a group, newest first,
//! each `--keep-*` rule keeps the newest snapshot of each of its last N
//! buckets (hour, day, ISO week, month, year — in UTC); a snapshot kept by
//! any rule is kept, and every kept one says why.

use std::collections::BTreeMap;

use imgstore_format::{Id, Snapshot};

/// The keep rules. All zero/empty means "keep nothing" and is refused by
/// the CLI unless snapshots are named explicitly.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub last: usize,
    pub hourly: usize,
    pub daily: usize,
    pub weekly: usize,
    pub monthly: usize,
    pub yearly: usize,
    /// Keep snapshots taken within this many nanoseconds of the group's newest.
    pub within_ns: Option<i64>,
    /// Keep snapshots carrying any of these tags.
    pub tags: Vec<String>,
}

impl Policy {
    pub fn is_empty(&self) -> bool {
        *self == Policy::default()
    }
}

/// The verdict on one snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub id: Id,
    pub name: String,
    pub time_ns: i64,
    pub keep: bool,
    /// Why it is kept ("last", "daily", "within", "tag daily", "protected").
    pub reasons: Vec<String>,
}

/// (year, month, day) of a day number since 1970-01-01 (proleptic Gregorian).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// ISO-8601 (year, week) of a day number since 1970-01-01.
fn iso_week(days: i64) -> (i64, i64) {
    // 1970-01-01 was a Thursday; ISO weeks start on Monday.
    let weekday = (days + 3).rem_euclid(7); // 0 = Monday
    let thursday = days - weekday + 3;
    let (y, _, _) = civil_from_days(thursday);
    let jan1 = days_from_civil(y, 1, 1);
    (y, (thursday - jan1) / 7 + 1)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

const NS_PER_HOUR: i64 = 3_600_000_000_000;

fn bucket(rule: &str, t: i64) -> i64 {
    let hours = t.div_euclid(NS_PER_HOUR);
    let days = hours.div_euclid(24);
    let (y, m, _) = civil_from_days(days);
    match rule {
        "hourly" => hours,
        "daily" => days,
        "weekly" => {
            let (wy, w) = iso_week(days);
            wy * 100 + w
        }
        "monthly" => y * 12 + m as i64,
        _ => y,
    }
}

/// Applies `policy` to `snaps` (any order); `protected` ids are always kept.
/// Returns decisions newest first within each name, names in order.
pub fn apply(snaps: &[(Id, Snapshot)], policy: &Policy, protected: &[Id]) -> Vec<Decision> {
    let mut groups: BTreeMap<&str, Vec<&(Id, Snapshot)>> = BTreeMap::new();
    for s in snaps {
        groups.entry(s.1.name.as_str()).or_default().push(s);
    }
    let mut out = Vec::new();
    for (_, mut group) in groups {
        group.sort_by_key(|(id, s)| std::cmp::Reverse((s.time_ns, *id)));
        let newest = group.first().map(|(_, s)| s.time_ns).unwrap_or(0);
        let rules: [(&str, usize); 5] = [
            ("hourly", policy.hourly),
            ("daily", policy.daily),
            ("weekly", policy.weekly),
            ("monthly", policy.monthly),
            ("yearly", policy.yearly),
        ];
        let mut used = [0usize; 5];
        let mut last_bucket: [Option<i64>; 5] = [None; 5];
        for (i, (id, s)) in group.iter().enumerate() {
            let mut reasons = Vec::new();
            if protected.contains(id) {
                reasons.push("protected".to_string());
            }
            if i < policy.last {
                reasons.push("last".into());
            }
            for (r, (rule, n)) in rules.iter().enumerate() {
                if used[r] < *n {
                    let b = bucket(rule, s.time_ns);
                    if last_bucket[r] != Some(b) {
                        last_bucket[r] = Some(b);
                        used[r] += 1;
                        reasons.push((*rule).into());
                    }
                }
            }
            if let Some(w) = policy.within_ns {
                if s.time_ns >= newest - w {
                    reasons.push("within".into());
                }
            }
            for t in &s.tags {
                if policy.tags.contains(t) {
                    reasons.push(format!("tag {t}"));
                }
            }
            out.push(Decision {
                id: *id,
                name: s.name.clone(),
                time_ns: s.time_ns,
                keep: !reasons.is_empty(),
                reasons,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgstore_format::SnapshotStats;

    const DAY: i64 = 24 * NS_PER_HOUR;

    fn at(y: i64, m: u32, d: u32, h: i64) -> i64 {
        days_from_civil(y, m, d) * DAY + h * NS_PER_HOUR
    }

    fn snap(t: i64, tags: &[&str]) -> (Id, Snapshot) {
        let s = Snapshot {
            time_ns: t,
            name: "vm".into(),
            hostname: "h".into(),
            source: "s".into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            size: 0,
            digest: [0; 32],
            region_size: 1 << 23,
            pages: vec![],
            stats: SnapshotStats::default(),
            bitmap: None,
        };
        (s.id(), s)
    }

    /// Snapshots spread over years: every 6 hours for the last 10 days,
    /// daily for 3 months before that, weekly for 3 years before that.
    fn history() -> Vec<(Id, Snapshot)> {
        let now = at(2026, 11, 25, 12);
        let mut v = Vec::new();
        for i in 0..40 {
            v.push(snap(now - i * 6 * NS_PER_HOUR, &[]));
        }
        for i in 0..90 {
            v.push(snap(
                now - 10 * DAY - i * DAY - 3 * NS_PER_HOUR,
                if i == 45 { &["pre-upgrade"] } else { &[] },
            ));
        }
        for i in 0..156 {
            v.push(snap(now - 100 * DAY - i * 7 * DAY, &[]));
        }
        v
    }

    fn kept(p: &Policy) -> Vec<i64> {
        let mut k: Vec<i64> = apply(&history(), p, &[])
            .into_iter()
            .filter(|d| d.keep)
            .map(|d| d.time_ns)
            .collect();
        k.sort_unstable_by(|a, b| b.cmp(a));
        k
    }

    #[test]
    fn calendar_helpers() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(days_from_civil(2024, 2, 29)), (2024, 2, 29));
        assert_eq!(iso_week(days_from_civil(2026, 1, 1)), (2026, 1)); // a Thursday
        assert_eq!(iso_week(days_from_civil(2021, 1, 3)), (2020, 53)); // a Sunday
        assert_eq!(iso_week(days_from_civil(2024, 12, 30)), (2025, 1)); // a Monday
    }

    #[test]
    fn keep_rules_table() {
        let now = at(2026, 11, 25, 12);
        let cases: Vec<(Policy, usize, Option<i64>)> = vec![
            (
                Policy {
                    last: 3,
                    ..Default::default()
                },
                3,
                Some(now - 12 * NS_PER_HOUR),
            ),
            (
                Policy {
                    hourly: 5,
                    ..Default::default()
                },
                5,
                Some(now - 24 * NS_PER_HOUR),
            ),
            // 6-hourly snapshots: 4 per day; the newest of each of the last 7 days.
            (
                Policy {
                    daily: 7,
                    ..Default::default()
                },
                7,
                Some(at(2026, 11, 19, 18)),
            ),
            (
                Policy {
                    weekly: 4,
                    ..Default::default()
                },
                4,
                None,
            ),
            (
                Policy {
                    monthly: 6,
                    ..Default::default()
                },
                6,
                None,
            ),
            (
                Policy {
                    yearly: 10,
                    ..Default::default()
                },
                4,
                None,
            ), // 2023..2026 present
            (
                Policy {
                    within_ns: Some(2 * DAY),
                    ..Default::default()
                },
                9,
                Some(now - 2 * DAY),
            ),
            (
                Policy {
                    tags: vec!["pre-upgrade".into()],
                    ..Default::default()
                },
                1,
                None,
            ),
            (Policy::default(), 0, None),
        ];
        for (p, n, oldest) in cases {
            let k = kept(&p);
            assert_eq!(k.len(), n, "{p:?}");
            if let Some(o) = oldest {
                assert_eq!(*k.last().unwrap(), o, "{p:?}");
            }
        }
        // Rules combine: union of what each keeps.
        let both = kept(&Policy {
            last: 2,
            daily: 3,
            ..Default::default()
        });
        assert_eq!(
            both.len(),
            4,
            "last 2 are both today; daily adds two earlier days"
        );
        // Monthly keeps the newest snapshot of each month.
        let m = kept(&Policy {
            monthly: 2,
            ..Default::default()
        });
        assert_eq!(m[0], now);
        assert_eq!(civil_from_days(m[1].div_euclid(DAY)).1, 10);
        assert_eq!(civil_from_days(m[1].div_euclid(DAY)).2, 31);
    }

    #[test]
    fn protected_and_reasons() {
        let h = history();
        let oldest = h.last().unwrap().0;
        let d = apply(
            &h,
            &Policy {
                last: 1,
                ..Default::default()
            },
            &[oldest],
        );
        let o = d.iter().find(|d| d.id == oldest).unwrap();
        assert!(o.keep);
        assert_eq!(o.reasons, vec!["protected".to_string()]);
        assert_eq!(d[0].reasons, vec!["last".to_string()]);
        assert_eq!(d.iter().filter(|d| d.keep).count(), 2);
    }
}
