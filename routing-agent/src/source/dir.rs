//! Standalone mode: Route (and StaticRoute) manifests from a directory (`*.yaml`, `*.yml`, multi-document
//! allowed), watched with inotify (notify crate). A file that does not parse is reported
//! with its path, line and reason, and its last good content stays in effect.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use super::Snapshot;
use crate::logic::crd::{API_VERSION, KIND, Route, STATIC_API_VERSION, StaticRoute};

/// A problem with one file, naming path and line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub reason: String,
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{l}: {}", self.path.display(), self.reason),
            None => write!(f, "{}: {}", self.path.display(), self.reason),
        }
    }
}

/// One object a manifest file holds.
#[derive(Clone, Debug, PartialEq)]
pub enum Document {
    Route(Route),
    /// The static route operator's (see [`crate::logic::owner::from_static`]).
    StaticRoute(StaticRoute),
}

/// Parses one file's text: every `kind: Route` document of our API group, and every
/// `kind: StaticRoute` of the static route operator's (as the Route it plans as, see
/// [`crate::logic::owner::from_static`]). Other kinds are skipped. Documents are separated
/// by `---` lines; a `kind: List` (what `kubectl get -o yaml` prints) is read item by item.
pub fn parse_file(path: &Path, text: &str) -> Result<Vec<Route>, FileError> {
    Ok(parse_documents(path, text)?
        .into_iter()
        .map(|d| match d {
            Document::Route(r) => r,
            Document::StaticRoute(sr) => crate::logic::owner::from_static(&sr),
        })
        .collect())
}

/// The Routes and StaticRoutes of one file's text, as they are (see [`parse_file`]).
pub fn parse_documents(path: &Path, text: &str) -> Result<Vec<Document>, FileError> {
    let mut out = Vec::new();
    let mut start = 0usize; // 0-based line where the current document starts
    let lines: Vec<&str> = text.lines().collect();
    let mut docs = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim_end() == "---" || line.starts_with("--- ") {
            docs.push((start, lines[start..i].join("\n")));
            start = i + 1;
        }
    }
    docs.push((start, lines[start.min(lines.len())..].join("\n")));
    for (first_line, doc) in docs {
        let err = |e: serde_yaml::Error| FileError {
            path: path.to_owned(),
            line: e.location().map(|l| first_line + l.line()),
            reason: e
                .to_string()
                .split(" at line ")
                .next()
                .unwrap_or_default()
                .to_string(),
        };
        let value: serde_yaml::Value = serde_yaml::from_str(&doc).map_err(err)?;
        if value.is_null() {
            continue;
        }
        let kind = value
            .get("kind")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        // A plain document is parsed from its text (errors keep their line); a List's items
        // from their values (errors name the List's first line).
        let listed = kind == "List";
        let items = if listed {
            match value.get("items") {
                Some(serde_yaml::Value::Sequence(items)) => items.clone(),
                _ => Vec::new(),
            }
        } else {
            vec![value]
        };
        for value in items {
            fn typed<T: serde::de::DeserializeOwned>(
                listed: bool,
                doc: &str,
                value: serde_yaml::Value,
            ) -> Result<T, serde_yaml::Error> {
                if listed {
                    serde_yaml::from_value(value)
                } else {
                    serde_yaml::from_str(doc)
                }
            }
            let field = |k: &str| {
                value
                    .get(k)
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_string()
            };
            let (api, kind) = (field("apiVersion"), field("kind"));
            let (d, name) = if kind == KIND && api == API_VERSION {
                let r: Route = typed(listed, &doc, value).map_err(err)?;
                let name = r.metadata.name.clone().unwrap_or_default();
                (Document::Route(r), name)
            } else if kind == "StaticRoute" && api == STATIC_API_VERSION {
                let sr: StaticRoute = typed(listed, &doc, value).map_err(err)?;
                let name = sr.metadata.name.clone().unwrap_or_default();
                (Document::StaticRoute(sr), name)
            } else {
                debug!(path = %path.display(), line = first_line + 1, %api, %kind, "not a Route; skipped");
                continue;
            };
            if name.is_empty() {
                return Err(FileError {
                    path: path.to_owned(),
                    line: Some(first_line + 1),
                    reason: format!("{kind} without metadata.name"),
                });
            }
            out.push(d);
        }
    }
    Ok(out)
}

/// What is known of one manifest file.
#[derive(Clone, Debug, Default)]
pub struct CachedFile {
    /// (inode, size, mtime): a file is parsed again only when this changes.
    stamp: Option<(u64, u64, std::time::SystemTime)>,
    /// Its last good content (kept while the file is broken).
    good: Option<Vec<Arc<Route>>>,
    error: Option<FileError>,
}

/// The directory source's memory between passes.
pub type DirCache = BTreeMap<PathBuf, CachedFile>;

fn stamp(path: &Path) -> Option<(u64, u64, std::time::SystemTime)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.len(), m.modified().ok()?))
}

/// A manifest's name: `*.yaml` or `*.yml`, not hidden (editors' and `write_atomic`'s
/// temporary files are).
fn is_manifest(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
        && !p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'))
}

/// Parses `path` again if it changed since `entry` saw it.
fn refresh(path: &Path, entry: &mut CachedFile) {
    let now = stamp(path);
    if now.is_some() && entry.stamp == now {
        return;
    }
    entry.stamp = now;
    let parsed = std::fs::read_to_string(path)
        .map_err(|e| FileError {
            path: path.to_owned(),
            line: None,
            reason: e.to_string(),
        })
        .and_then(|text| parse_file(path, &text));
    match parsed {
        Ok(routes) => {
            // Collected into a Vec of its own size: `into_iter().map().collect()` would reuse
            // the parser's buffer in place, and each file would keep room for four whole
            // Documents behind its few pointers (2 KiB a file, 4.3 MiB at 2,000 files,
            // measured with heaptrack).
            let mut good = Vec::with_capacity(routes.len());
            good.extend(routes.into_iter().map(Arc::new));
            entry.good = Some(good);
            entry.error = None;
        }
        Err(e) => entry.error = Some(e),
    }
}

/// Reads a directory into a snapshot. Files are parsed again only when they changed; a
/// broken file keeps its last good content. Returns the snapshot and the current errors.
pub fn load(dir: &Path, cache: &mut DirCache) -> (Snapshot, Vec<FileError>) {
    // A set: the cache is pruned by membership, which over a Vec compared every cached path
    // with every file (4 million path comparisons per change at 2,000 files, the largest
    // part of an edit's latency at 10,000 prefixes).
    let files: BTreeSet<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| is_manifest(p))
            .collect(),
        Err(e) => {
            let (snapshot, mut errors) = assemble(cache);
            errors.push(FileError {
                path: dir.to_owned(),
                line: None,
                reason: format!("cannot read the directory: {e}; keeping the last good state"),
            });
            return (snapshot, errors);
        }
    };
    cache.retain(|p, _| files.contains(p));
    for path in &files {
        refresh(path, cache.entry(path.clone()).or_default());
    }
    assemble(cache)
}

/// Like [`load`], for the files that inotify named only (created, written, renamed or
/// removed): an edit costs the files it touched, not a `stat` of every file. The full
/// [`load`] stays the safety net (at start, on a queue overflow, every few seconds).
pub fn load_changed(
    cache: &mut DirCache,
    changed: &BTreeSet<PathBuf>,
) -> (Snapshot, Vec<FileError>) {
    for path in changed.iter().filter(|p| is_manifest(p)) {
        if std::fs::symlink_metadata(path).is_err() {
            cache.remove(path);
            continue;
        }
        refresh(path, cache.entry(path.clone()).or_default());
    }
    assemble(cache)
}

/// The snapshot of what the cache holds: every file's last good Routes; a name defined in
/// two files is kept from the first (in path order) and reported in the other.
fn assemble(cache: &DirCache) -> (Snapshot, Vec<FileError>) {
    let mut errors: Vec<FileError> = cache.values().filter_map(|c| c.error.clone()).collect();
    let mut seen: BTreeMap<&str, &Path> = BTreeMap::new();
    let mut routes = Vec::new();
    for (path, c) in cache.iter() {
        for r in c.good.iter().flatten() {
            let name = r.metadata.name.as_deref().unwrap_or_default();
            if let Some(first) = seen.get(name) {
                errors.push(FileError {
                    path: path.clone(),
                    line: None,
                    reason: format!(
                        "{} is also defined in {}; this copy is ignored",
                        crate::logic::owner::describe(name),
                        first.display()
                    ),
                });
                continue;
            }
            seen.insert(name, path);
            routes.push(r.clone());
        }
    }
    (
        Snapshot {
            routes,
            node_labels: None,
            control_plane: None,
        },
        errors,
    )
}

/// What inotify reported since the source last looked.
#[derive(Default)]
struct Changes {
    paths: BTreeSet<PathBuf>,
    /// Events were lost (queue overflow) or concern the directory itself: read it all.
    rescan: bool,
}

/// How often the whole directory is read even without an inotify event (file systems
/// without inotify; events lost without an overflow mark).
const POLL: Duration = Duration::from_secs(10);

/// Watches `dir` and sends a snapshot at start and after every change (debounced).
pub fn spawn(dir: PathBuf, tx: mpsc::Sender<Snapshot>) -> anyhow::Result<()> {
    spawn_polling(dir, tx, POLL)
}

fn spawn_polling(dir: PathBuf, tx: mpsc::Sender<Snapshot>, poll: Duration) -> anyhow::Result<()> {
    let (ev_tx, mut ev_rx) = mpsc::channel::<()>(1);
    let changes = Arc::new(std::sync::Mutex::new(Changes::default()));
    let noted = changes.clone();
    let watched = dir.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        // Reading the directory is an access event itself: reacting to those made the
        // source re-read the directory in a loop (50 times a second, the whole snapshot
        // cloned and compared each time). Only changes count.
        let mut c = noted.lock().unwrap_or_else(|e| e.into_inner());
        match res {
            Ok(e) if matches!(e.kind, notify::EventKind::Access(_)) => return,
            Ok(e) => {
                c.rescan |= e.need_rescan()
                    || e.paths.is_empty()
                    || e.paths
                        .iter()
                        .any(|p| p.parent() != Some(watched.as_path()));
                c.paths.extend(e.paths);
            }
            Err(_) => c.rescan = true,
        }
        drop(c);
        let _ = ev_tx.try_send(());
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    info!(dir = %dir.display(), "watching Route manifests");
    tokio::spawn(async move {
        let _watcher = watcher; // dropped with the task
        let mut cache = DirCache::new();
        let mut last_errors: Vec<FileError> = Vec::new();
        let mut last_sent: Option<Snapshot> = None;
        let mut full = true;
        let mut watching = true;
        loop {
            // What inotify noted so far: read those files, or everything (a full read
            // covers what was noted).
            let c = std::mem::take(&mut *changes.lock().unwrap_or_else(|e| e.into_inner()));
            let (snap, errors) = if full || c.rescan {
                load(&dir, &mut cache)
            } else {
                load_changed(&mut cache, &c.paths)
            };
            if errors != last_errors {
                for e in &errors {
                    error!(file = %e.path.display(), line = e.line, "invalid manifest, last good content kept: {e}");
                }
                last_errors = errors;
            }
            if !last_sent.as_ref().is_some_and(|l| l.same(&snap)) {
                if tx.send(snap.clone()).await.is_err() {
                    return;
                }
                last_sent = Some(snap);
            }
            // Wait for a change, then let a burst of writes settle. A slow full poll covers
            // file systems without inotify.
            tokio::select! {
                r = ev_rx.recv(), if watching => {
                    if r.is_none() {
                        warn!(every = ?poll, "directory watch ended; polling");
                        watching = false;
                    }
                    full = r.is_none();
                }
                _ = tokio::time::sleep(poll) => full = true,
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            while ev_rx.try_recv().is_ok() {}
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_route_documents_plan_as_routes_keyed_by_their_kind() {
        // The static route operator's example, verbatim in shape.
        let text = "apiVersion: networking.digitalocean.com/v1\nkind: StaticRoute\nmetadata:\n  name: static-route-ifconfig.me\nspec:\n  destinations:\n    - \"34.160.111.145\"\n  gateway: \"10.116.0.5\"\n---\napiVersion: networking.doks.digitalocean.com/v1alpha1\nkind: Route\nmetadata: {name: static-route-ifconfig.me}\nspec: {destinations: [\"1.2.3.4/5\"], gateways: [\"10.114.0.3\"]}\n";
        let routes = parse_file(Path::new("f.yaml"), text).unwrap();
        assert_eq!(routes.len(), 2);
        assert_eq!(
            routes[0].metadata.name.as_deref(),
            Some("StaticRoute/static-route-ifconfig.me")
        );
        assert_eq!(routes[0].spec.gateways, vec!["10.116.0.5".to_string()]);
        assert_eq!(
            routes[1].metadata.name.as_deref(),
            Some("static-route-ifconfig.me"),
            "a Route of the same name is another object"
        );
        let nameless = "apiVersion: networking.digitalocean.com/v1\nkind: StaticRoute\nmetadata: {labels: {a: b}}\nspec: {destinations: [\"1.1.1.1\"], gateway: \"10.0.0.1\"}\n";
        let err = parse_file(Path::new("f.yaml"), nameless).unwrap_err();
        assert!(
            err.reason.contains("StaticRoute without metadata.name"),
            "{err}"
        );
    }

    #[test]
    fn a_list_as_kubectl_prints_it_is_read_item_by_item() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: networking.digitalocean.com/v1\n  kind: StaticRoute\n  metadata: {name: a, finalizers: [kopf.zalando.org/KopfFinalizerMarker]}\n  spec: {destinations: [\"34.117.59.81\"], gateway: \"10.116.0.5\"}\n  status: {create_fn: [{destination: 34.117.59.81, status: Ready}]}\n- apiVersion: v1\n  kind: ConfigMap\n  metadata: {name: x}\n- apiVersion: networking.doks.digitalocean.com/v1alpha1\n  kind: Route\n  metadata: {name: b}\n  spec: {destinations: [\"1.2.3.4/5\"], gateways: [\"10.114.0.3\"]}\nmetadata: {resourceVersion: \"\"}\n";
        let docs = parse_documents(Path::new("f.yaml"), text).unwrap();
        assert_eq!(docs.len(), 2, "{docs:?}");
        let Document::StaticRoute(sr) = &docs[0] else {
            panic!("{docs:?}")
        };
        assert_eq!(sr.spec.gateway, "10.116.0.5");
        assert!(matches!(&docs[1], Document::Route(r) if r.metadata.name.as_deref() == Some("b")));
        let bad = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: networking.digitalocean.com/v1\n  kind: StaticRoute\n  metadata: {name: a}\n  spec: {destinations: 5, gateway: \"10.116.0.5\"}\n";
        let e = parse_documents(Path::new("f.yaml"), bad).unwrap_err();
        assert!(e.reason.contains("invalid type"), "{e}");
    }

    #[test]
    fn multi_document_files_skip_other_kinds() {
        let text = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n---\napiVersion: networking.doks.digitalocean.com/v1alpha1\nkind: Route\nmetadata: {name: a}\nspec: {destinations: [\"1.2.3.4/5\"], gateways: [\"10.114.0.3\"]}\n---\n";
        let routes = parse_file(Path::new("f.yaml"), text).unwrap();
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].metadata.name.as_deref(), Some("a"));
    }

    #[test]
    fn errors_name_path_and_line() {
        let text = "apiVersion: networking.doks.digitalocean.com/v1alpha1\nkind: Route\nmetadata: {name: a}\nspec: {destinations: [\"1.2.3.4/5\"], gateways: [\"10.114.0.3\"]}\n---\napiVersion: networking.doks.digitalocean.com/v1alpha1\nkind: Route\nmetadata: {name: b}\nspec:\n  destinations: 5\n  gateways: [\"10.114.0.3\"]\n";
        let e = parse_file(Path::new("/r/f.yaml"), text).unwrap_err();
        assert_eq!(e.line, Some(10), "{e}");
        assert!(e.to_string().starts_with("/r/f.yaml:10: "), "{e}");
        let e = parse_file(Path::new("g.yaml"), "a: [\n").unwrap_err();
        assert!(e.line.is_some(), "{e}");
        let e = parse_file(Path::new("h.yaml"), "apiVersion: networking.doks.digitalocean.com/v1alpha1\nkind: Route\nspec: {destinations: [], gateways: []}\n").unwrap_err();
        assert!(e.reason.contains("metadata"), "{e}");
    }

    /// Through inotify, with the poll out of reach: only the incremental reads can deliver.
    #[tokio::test]
    async fn edits_arrive_through_inotify_alone() {
        let dir = std::env::temp_dir().join(format!("ra-dir-inotify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let manifest = |name: &str| {
            format!(
                "apiVersion: networking.doks.digitalocean.com/v1alpha1\nkind: Route\nmetadata: {{name: {name}}}\nspec: {{destinations: [\"1.0.0.0/8\"], gateways: [\"10.0.0.1\"]}}\n"
            )
        };
        std::fs::write(dir.join("a.yaml"), manifest("a")).unwrap();
        let (tx, mut rx) = mpsc::channel(4);
        spawn_polling(dir.clone(), tx, Duration::from_secs(3600)).unwrap();
        let mut next = async || -> Vec<String> {
            let s = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .expect("a snapshot")
                .unwrap();
            s.routes
                .iter()
                .map(|r| r.metadata.name.clone().unwrap())
                .collect()
        };
        assert_eq!(next().await, ["a"]);
        // Written beside, renamed into place (as editors and `kubectl cp` do).
        std::fs::write(dir.join(".b.yaml.tmp"), manifest("b")).unwrap();
        std::fs::rename(dir.join(".b.yaml.tmp"), dir.join("b.yaml")).unwrap();
        assert_eq!(next().await, ["a", "b"]);
        std::fs::remove_file(dir.join("a.yaml")).unwrap();
        assert_eq!(next().await, ["b"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_the_files_inotify_named_are_read_again() {
        let dir = std::env::temp_dir().join(format!("ra-dir-changed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let manifest = |name: &str, gw: &str| {
            format!(
                "apiVersion: networking.doks.digitalocean.com/v1alpha1\nkind: Route\nmetadata: {{name: {name}}}\nspec: {{destinations: [\"1.0.0.0/8\"], gateways: [\"{gw}\"]}}\n"
            )
        };
        let gateways = |snap: &Snapshot| -> Vec<(String, String)> {
            snap.routes
                .iter()
                .map(|r| (r.metadata.name.clone().unwrap(), r.spec.gateways[0].clone()))
                .collect()
        };
        std::fs::write(dir.join("a.yaml"), manifest("a", "10.0.0.1")).unwrap();
        std::fs::write(dir.join("b.yaml"), manifest("b", "10.0.0.1")).unwrap();
        let mut cache = DirCache::new();
        let (before, _) = load(&dir, &mut cache);
        // a.yaml rewritten (with a new length), b.yaml too but not named: only a is read.
        std::fs::write(dir.join("a.yaml"), manifest("a", "10.0.0.22")).unwrap();
        std::fs::write(dir.join("b.yaml"), manifest("b", "10.0.0.33")).unwrap();
        let named: BTreeSet<PathBuf> = [dir.join("a.yaml")].into();
        let (snap, errors) = load_changed(&mut cache, &named);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            gateways(&snap),
            [
                ("a".into(), "10.0.0.22".into()),
                ("b".into(), "10.0.0.1".into())
            ]
        );
        // The untouched Route is the same object as before (the planner's fast path).
        assert!(Arc::ptr_eq(&snap.routes[1], &before.routes[1]));
        // Renamed into place from a hidden temporary file, and removed: both named.
        std::fs::write(dir.join(".c.yaml.tmp"), manifest("c", "10.0.0.4")).unwrap();
        std::fs::rename(dir.join(".c.yaml.tmp"), dir.join("c.yaml")).unwrap();
        std::fs::remove_file(dir.join("a.yaml")).unwrap();
        let named: BTreeSet<PathBuf> = [
            dir.join(".c.yaml.tmp"),
            dir.join("c.yaml"),
            dir.join("a.yaml"),
        ]
        .into();
        let (snap, _) = load_changed(&mut cache, &named);
        assert_eq!(
            gateways(&snap),
            [
                ("b".into(), "10.0.0.1".into()),
                ("c".into(), "10.0.0.4".into())
            ]
        );
        // The full read catches what inotify did not name.
        let (snap, _) = load(&dir, &mut cache);
        assert_eq!(gateways(&snap)[0], ("b".into(), "10.0.0.33".into()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn broken_file_keeps_its_last_good_content_and_duplicates_are_reported() {
        let dir = std::env::temp_dir().join(format!("ra-dir-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = "apiVersion: networking.doks.digitalocean.com/v1alpha1\nkind: Route\nmetadata: {name: a}\nspec: {destinations: [\"1.0.0.0/8\"], gateways: [\"10.0.0.1\"]}\n";
        std::fs::write(dir.join("a.yaml"), good).unwrap();
        std::fs::write(dir.join("b.yml"), good).unwrap();
        std::fs::write(dir.join("notes.txt"), "ignored").unwrap();
        let mut last = DirCache::new();
        let (snap, errors) = load(&dir, &mut last);
        assert_eq!(snap.routes.len(), 1);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].reason.contains("also defined in"), "{errors:?}");
        std::fs::write(dir.join("a.yaml"), "kind: [broken").unwrap();
        std::fs::remove_file(dir.join("b.yml")).unwrap();
        let (snap, errors) = load(&dir, &mut last);
        assert_eq!(snap.routes.len(), 1, "last good content of a.yaml kept");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].path, dir.join("a.yaml"));
        std::fs::remove_file(dir.join("a.yaml")).unwrap();
        let (snap, errors) = load(&dir, &mut last);
        assert!(
            snap.routes.is_empty() && errors.is_empty(),
            "deleted file drops its routes"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
