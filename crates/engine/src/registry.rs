//! The set of bucket versions serving now. Built off the hot path from `buckets/`, swapped in
//! whole between rounds. A file that fails to load never replaces the version it would succeed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use membrane_abi::Fact;
use membrane_criteria::bucket::{self, BucketBody, BucketDef, EntryLimit, OnChange};
use membrane_criteria::compile;
use membrane_store::{BucketSwitch, BucketVersion, EntryRule, QueuedUser};
use membrane_wasm::Predicate;
use sha2::{Digest, Sha256};

/// One loaded, compiled and test-instantiated bucket version.
pub struct LoadedBucket {
    pub def: BucketDef,
    pub predicate: Predicate,
    pub facts: Vec<Fact>,
    /// Identifies this version's membership rule: criteria text, or plugin bytes and config.
    pub hash: String,
    pub time_based: bool,
}

impl LoadedBucket {
    pub fn id(&self) -> &str {
        &self.def.id
    }

    /// The row every engine and the console read about this version.
    pub fn version(&self) -> BucketVersion {
        BucketVersion {
            id: self.def.id.clone(),
            source_path: self.def.path.display().to_string(),
            description: self.def.description.clone(),
            definition: self.def.source.clone(),
            criteria_hash: self.hash.clone(),
            time_based: self.time_based,
        }
    }

    pub fn entry_rule(&self) -> EntryRule {
        match self.def.entry_limit {
            EntryLimit::Unlimited => EntryRule::Unlimited,
            EntryLimit::Once => EntryRule::Once,
            EntryLimit::OncePerPeriod { period_secs } => {
                EntryRule::OncePerPeriod(period_secs as i64)
            }
        }
    }

    /// Serving and switched on, by its file and by the operator.
    pub fn enabled(&self, switches: &HashMap<String, BucketSwitch>) -> bool {
        self.def.enabled && switches.get(self.id()).is_none_or(|s| s.enabled)
    }

    /// The version the engines last recorded for this bucket is this one: a sweep or backfill
    /// by an engine still on another version would undo the newer one's work.
    pub fn recorded(&self, switches: &HashMap<String, BucketSwitch>) -> bool {
        switches
            .get(self.id())
            .is_none_or(|s| s.criteria_hash == self.hash)
    }

    /// Membership or transitions can change with no event: windows, `now()`, dwell rules.
    pub fn moves_with_the_clock(&self) -> bool {
        let def = &self.def;
        self.time_based
            || def.min_dwell_secs.is_some()
            || def.max_dwell_secs.is_some()
            || !def.dwell.is_empty()
            || def.dwell_every_secs.is_some()
    }

    /// Whether the user's unprocessed change touches a fact this bucket reads.
    pub fn affected_by(&self, change: &QueuedUser) -> bool {
        self.facts.iter().any(|fact| match fact {
            Fact::EventCount { event, .. } => change.event_names.contains(event),
            Fact::Property { key } | Fact::PropertyTime { key } => change.prop_keys.contains(key),
        })
    }

    /// Joins found by re-evaluating everyone after a criteria change.
    pub fn rule_after_change(&self) -> EntryRule {
        match self.def.on_change {
            OnChange::Emit => self.entry_rule(),
            OnChange::Silent => EntryRule::Silent,
        }
    }
}

/// A bucket file that did not load, with its rendered diagnostic.
#[derive(Debug, Clone)]
pub struct LoadFailure {
    pub id: String,
    pub path: PathBuf,
    pub source: String,
    pub message: String,
}

#[derive(Default, Clone)]
pub struct Registry {
    pub buckets: BTreeMap<String, Arc<LoadedBucket>>,
    by_event: HashMap<String, Vec<String>>,
    by_prop: HashMap<String, Vec<String>>,
    /// The version each bucket served before its current one: it takes over if the current
    /// version faults at run time.
    fallbacks: HashMap<String, Arc<LoadedBucket>>,
    /// Versions (bucket id → hash) that faulted at run time, with the fault. They are not
    /// loaded again until their file changes.
    faulted: HashMap<String, (String, String)>,
}

/// The outcome of reading `buckets/` once.
pub struct Reload {
    pub registry: Registry,
    /// Buckets whose version is new in this reload (loaded now, not carried over).
    pub changed: Vec<Arc<LoadedBucket>>,
    pub failures: Vec<LoadFailure>,
    /// Ids that served before and have no file any more.
    pub removed: Vec<String>,
}

impl Registry {
    /// Buckets whose criteria mention one of the user's changed facts. Because criteria are
    /// false for a blank user, no other bucket can change for this user.
    pub fn candidates<'a>(&'a self, user: &QueuedUser) -> BTreeSet<&'a str> {
        let events = user.event_names.iter().filter_map(|e| self.by_event.get(e));
        let props = user.prop_keys.iter().filter_map(|k| self.by_prop.get(k));
        events.chain(props).flatten().map(String::as_str).collect()
    }

    /// Keeps a version that served in `previous`, with the fallback it had there.
    fn carry_over(&mut self, previous: &Registry, bucket: Arc<LoadedBucket>) {
        if let Some(fallback) = previous.fallbacks.get(bucket.id()) {
            self.fallbacks
                .insert(bucket.id().to_owned(), fallback.clone());
        }
        self.insert(bucket);
    }

    fn insert(&mut self, bucket: Arc<LoadedBucket>) {
        for fact in &bucket.facts {
            let (index, key) = match fact {
                Fact::EventCount { event, .. } => (&mut self.by_event, event),
                Fact::Property { key } | Fact::PropertyTime { key } => (&mut self.by_prop, key),
            };
            let ids = index.entry(key.clone()).or_default();
            if !ids.contains(&bucket.def.id) {
                ids.push(bucket.def.id.clone());
            }
        }
        self.buckets.insert(bucket.def.id.clone(), bucket);
    }

    /// Bucket versions recorded in the database that this registry does not serve (and did not
    /// take out of service after a fault). While there are any, this engine is behind another
    /// one's reload: evaluating with what it has would consume changes with the wrong version.
    pub fn behind<'a>(&self, switches: &'a HashMap<String, BucketSwitch>) -> Vec<&'a str> {
        switches
            .iter()
            .filter(|(_, switch)| !switch.removed && !switch.criteria_hash.is_empty())
            .filter(|(id, switch)| {
                let serving = self.buckets.get(*id).map(|b| &b.hash);
                let faulted = self.faulted.get(*id).map(|(hash, _)| hash);
                serving != Some(&switch.criteria_hash) && faulted != Some(&switch.criteria_hash)
            })
            .map(|(id, _)| id.as_str())
            .collect()
    }

    pub fn has_fallback(&self, id: &str) -> bool {
        self.fallbacks.contains_key(id)
    }

    /// This registry with `bucket`'s version taken out after a run-time fault: the version it
    /// replaced serves again if there is one, else the bucket stops until its file changes.
    pub fn without_faulted(&self, bucket: &LoadedBucket, fault: &str) -> Registry {
        let id = bucket.id();
        let mut next = Registry {
            fallbacks: self.fallbacks.clone(),
            faulted: self.faulted.clone(),
            ..Registry::default()
        };
        next.faulted
            .insert(id.to_owned(), (bucket.hash.clone(), fault.to_owned()));
        let fallback = next.fallbacks.remove(id);
        for (other_id, other) in &self.buckets {
            if other_id != id {
                next.insert(other.clone());
            }
        }
        if let Some(fallback) = fallback.filter(|f| f.hash != bucket.hash) {
            next.insert(fallback);
        }
        next
    }

    /// Reads every bucket file in `dir`; unchanged versions are carried over from `self`
    /// without recompiling, and a file that fails keeps its previous version serving.
    pub fn reload(&self, dir: &Path, wasm: &membrane_wasm::Engine) -> Reload {
        let report = bucket::load_dir(dir);
        let mut next = Registry {
            faulted: self.faulted.clone(),
            ..Registry::default()
        };
        let mut changed = Vec::new();
        let mut failures: Vec<LoadFailure> = report
            .errors
            .iter()
            .map(|diagnostics| {
                let path = PathBuf::from(&diagnostics.path);
                LoadFailure {
                    id: id_from_path(&path),
                    path,
                    source: diagnostics.source.clone(),
                    message: diagnostics.render(),
                }
            })
            .collect();
        for def in report.buckets {
            match self.build(def, wasm) {
                Ok((bucket, true)) => {
                    changed.push(bucket.clone());
                    if let Some(replaced) = self.buckets.get(bucket.id()) {
                        next.fallbacks
                            .insert(bucket.id().to_owned(), replaced.clone());
                    }
                    next.insert(bucket);
                }
                Ok((bucket, false)) => next.carry_over(self, bucket),
                Err(failure) => failures.push(failure),
            }
        }
        for failure in &failures {
            if let Some(previous) = self.buckets.get(&failure.id) {
                if !next.buckets.contains_key(&failure.id) {
                    next.carry_over(self, previous.clone());
                }
            }
        }
        let removed = self
            .buckets
            .keys()
            .filter(|id| !next.buckets.contains_key(*id))
            .cloned()
            .collect();
        Reload {
            registry: next,
            changed,
            failures,
            removed,
        }
    }

    fn build(
        &self,
        def: BucketDef,
        wasm: &membrane_wasm::Engine,
    ) -> Result<(Arc<LoadedBucket>, bool), LoadFailure> {
        let failure = |message: String| LoadFailure {
            id: def.id.clone(),
            path: def.path.clone(),
            source: def.source.clone(),
            message,
        };
        let (module, hash) = match &def.body {
            BucketBody::Criteria { plan, .. } => (compile::compile(plan).wasm, def.criteria_hash()),
            BucketBody::Plugin { path, .. } => {
                let bytes = std::fs::read(path).map_err(|e| {
                    failure(format!(
                        "error: cannot read plugin module {}: {e}\n  --> {}\n  = help: build it with `cargo build --release --target wasm32-unknown-unknown` and point `plugin` at the .wasm file",
                        path.display(),
                        def.path.display()
                    ))
                })?;
                let digest = hex::encode(Sha256::digest(&bytes));
                (bytes, format!("{}:{digest}", def.criteria_hash()))
            }
        };
        if let Some(previous) = self.buckets.get(&def.id) {
            if previous.hash == hash && previous.def.source == def.source {
                return Ok((previous.clone(), false));
            }
        }
        if let Some((faulted_hash, fault)) = self.faulted.get(&def.id) {
            if *faulted_hash == hash {
                return Err(failure(fault.clone()));
            }
        }
        let loaded = match &def.body {
            BucketBody::Criteria { .. } => wasm.load(&module),
            BucketBody::Plugin { config, .. } => wasm.load_with_config(&module, config),
        };
        let predicate = loaded.map_err(|e| {
            failure(format!(
                "error: bucket `{}` failed to load its predicate: {e}\n  --> {}",
                def.id,
                def.path.display()
            ))
        })?;
        let facts = predicate.manifest().facts.clone();
        let time_based = match &def.body {
            BucketBody::Criteria { plan, .. } => plan.time_based,
            BucketBody::Plugin { .. } => facts.iter().any(|fact| {
                matches!(
                    fact,
                    Fact::EventCount {
                        within_secs: Some(_),
                        ..
                    }
                )
            }),
        };
        Ok((
            Arc::new(LoadedBucket {
                def,
                predicate,
                facts,
                hash,
                time_based,
            }),
            true,
        ))
    }
}

/// The id a broken file would have: its stem, as for files without an `id` key.
fn id_from_path(path: &Path) -> String {
    path.file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_default()
}
