//! The routing-agent image, written without a container engine (`cargo xtask image`).
//!
//! One layer holds the static binary at [`BINARY`] and nothing else (no shell, no libc: the
//! binary is linked with `+crt-static`). The archive is one tar that is at the same time an
//! **OCI image layout** (`oci-layout`, `index.json`, `blobs/sha256/…`) and a
//! **docker-archive** (`manifest.json` naming the same blobs), the shape `docker save` has
//! written since Docker 25, so that `ctr images import`, `podman load`, `docker load` and
//! `skopeo` (as `oci-archive:` or `docker-archive:`) all read the same file.
//!
//! Reproducible: every tar header has mtime 0, uid/gid 0 and no user names, entries are in a
//! fixed order, the layer is uncompressed (no compressor version in the digest), the config's
//! `created` is the epoch, and the JSON documents go through `serde_json::Value`, whose maps
//! are sorted. The same binary and reference give the same bytes, hence the same digest.
//!
//! The OCI documents are `oci-spec` types and the tars are the `tar` crate's; what is
//! written by hand is only the docker-archive's `manifest.json` (three fields, no crate
//! models it) and the choice of entries.
use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr as _;

use anyhow::{Context as _, Result, bail};
use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, DescriptorBuilder, HistoryBuilder, ImageConfigurationBuilder,
    ImageIndexBuilder, ImageManifestBuilder, MediaType, Os, RootFsBuilder, SCHEMA_VERSION,
    Sha256Digest,
};
use sha2::{Digest as _, Sha256};

/// Where the binary lives in the image (the DaemonSet's `command: ["routing-agent", …]`
/// finds it through [`PATH`]).
pub const BINARY: &str = "/usr/local/bin/routing-agent";
/// The image's only environment variable: a scratch image has no default `PATH`.
pub const PATH: &str = "PATH=/usr/local/bin:/usr/bin:/bin";
/// How the binary is linked, here and in the `Containerfile` (a test checks both).
pub const STATIC_RUSTFLAGS: &str = "-C target-feature=+crt-static";
/// The repository the manifests under `deploy/` name.
pub const REPOSITORY: &str = "ghcr.io/routing-agent/routing-agent";

/// The image's labels (the `Containerfile` carries the same ones; a test compares them).
pub fn labels() -> Vec<(&'static str, &'static str)> {
    vec![
        ("org.opencontainers.image.title", "routing-agent"),
        (
            "org.opencontainers.image.description",
            "Static and ECMP routes from Route resources, with eBPF gateway health",
        ),
        ("org.opencontainers.image.licenses", "Apache-2.0"),
        (
            "org.opencontainers.image.version",
            env!("CARGO_PKG_VERSION"),
        ),
    ]
}

/// The reference the deploy manifests use: `REPOSITORY:<crate version>`.
pub fn reference() -> String {
    format!("{REPOSITORY}:{}", env!("CARGO_PKG_VERSION"))
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// `sha256:…` of the manifest: the image's digest, as `ctr images ls` shows it.
    pub digest: String,
    /// `sha256:…` of the config: the image id, as `docker images` shows it.
    pub config: String,
    /// Bytes of the one layer (uncompressed) and of the whole archive.
    pub layer_bytes: u64,
    pub archive_bytes: u64,
}

fn sha256(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

fn descriptor(media: MediaType, data: &[u8]) -> Result<Descriptor> {
    Ok(DescriptorBuilder::default()
        .media_type(media)
        .size(data.len() as u64)
        .digest(Sha256Digest::from_str(&sha256(data))?)
        .build()?)
}

/// A JSON document with sorted keys (`oci-spec` keeps labels and annotations in HashMaps).
fn canonical<T: serde::Serialize>(doc: &T) -> Result<Vec<u8>> {
    Ok(serde_json::to_vec(&serde_json::to_value(doc)?)?)
}

fn header(path: &str, kind: tar::EntryType, mode: u32, size: u64) -> Result<tar::Header> {
    let mut h = tar::Header::new_ustar();
    h.set_path(path)?;
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    Ok(h)
}

/// One tar entry: a directory (its path ends in `/`), or a file with its mode.
enum Entry<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8], u32),
}

/// A tar of `entries`, in the given order.
fn tar_of(entries: &[Entry]) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        match *e {
            Entry::Dir(path) => {
                b.append(&header(path, tar::EntryType::Directory, 0o755, 0)?, &[][..])?
            }
            Entry::File(path, data, mode) => b.append(
                &header(path, tar::EntryType::Regular, mode, data.len() as u64)?,
                data,
            )?,
        }
    }
    Ok(b.into_inner()?)
}

/// The layer: the binary at [`BINARY`] (mode 0755, root) and its parent directories.
pub fn layer(binary: &[u8]) -> Result<Vec<u8>> {
    tar_of(&[
        Entry::Dir("usr/"),
        Entry::Dir("usr/local/"),
        Entry::Dir("usr/local/bin/"),
        Entry::File(&BINARY[1..], binary, 0o755),
    ])
}

/// The archive's bytes for `binary` tagged `reference` (`repository:tag`).
pub fn archive(binary: &[u8], reference: &str) -> Result<(Vec<u8>, Written)> {
    let Some((_, tag)) = reference
        .rsplit_once(':')
        .filter(|(r, t)| !r.is_empty() && !t.is_empty() && !t.contains('/'))
    else {
        bail!("image reference {reference:?} is not repository:tag");
    };
    let layer = layer(binary)?;
    let layer_digest = format!("sha256:{}", sha256(&layer));
    let labels: HashMap<String, String> = labels()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let config = ImageConfigurationBuilder::default()
        .created("1970-01-01T00:00:00Z".to_string())
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .config(
            ConfigBuilder::default()
                .entrypoint(vec![BINARY.to_string()])
                .env(vec![PATH.to_string()])
                .labels(labels)
                .build()?,
        )
        .rootfs(
            RootFsBuilder::default()
                .typ("layers".to_string())
                .diff_ids(vec![layer_digest.clone()])
                .build()?,
        )
        .history(vec![
            HistoryBuilder::default()
                .created("1970-01-01T00:00:00Z".to_string())
                .created_by(format!("cargo xtask image ({BINARY})"))
                .build()?,
        ])
        .build()?;
    let config = canonical(&config)?;
    let manifest = ImageManifestBuilder::default()
        .schema_version(SCHEMA_VERSION)
        .media_type(MediaType::ImageManifest)
        .config(descriptor(MediaType::ImageConfig, &config)?)
        .layers(vec![descriptor(MediaType::ImageLayer, &layer)?])
        .build()?;
    let manifest = canonical(&manifest)?;
    let mut pointer = descriptor(MediaType::ImageManifest, &manifest)?;
    pointer.set_annotations(Some(HashMap::from([
        (
            "io.containerd.image.name".to_string(),
            reference.to_string(),
        ),
        (
            "org.opencontainers.image.ref.name".to_string(),
            tag.to_string(),
        ),
    ])));
    let index = ImageIndexBuilder::default()
        .schema_version(SCHEMA_VERSION)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![pointer])
        .build()?;
    let index = canonical(&index)?;
    let (layer_hex, config_hex, manifest_hex) =
        (sha256(&layer), sha256(&config), sha256(&manifest));
    let blob = |hex: &str| format!("blobs/sha256/{hex}");
    // The docker-archive's index (docker's own format; no crate models it).
    let docker = serde_json::to_vec(&serde_json::json!([{
        "Config": blob(&config_hex),
        "RepoTags": [reference],
        "Layers": [blob(&layer_hex)],
    }]))?;
    let layout = serde_json::to_vec(&serde_json::json!({"imageLayoutVersion": "1.0.0"}))?;
    let mut blobs = [
        (blob(&config_hex), &config),
        (blob(&layer_hex), &layer),
        (blob(&manifest_hex), &manifest),
    ];
    blobs.sort_by(|a, b| a.0.cmp(&b.0));
    let mut entries = vec![
        Entry::File("oci-layout", &layout, 0o644),
        Entry::File("index.json", &index, 0o644),
        Entry::File("manifest.json", &docker, 0o644),
        Entry::Dir("blobs/"),
        Entry::Dir("blobs/sha256/"),
    ];
    for (path, data) in &blobs {
        entries.push(Entry::File(path, data, 0o644));
    }
    let bytes = tar_of(&entries)?;
    let written = Written {
        digest: format!("sha256:{manifest_hex}"),
        config: format!("sha256:{config_hex}"),
        layer_bytes: layer.len() as u64,
        archive_bytes: bytes.len() as u64,
    };
    Ok((bytes, written))
}

/// Writes the archive for the binary at `binary` to `out` (atomically: a reader never sees
/// half an archive).
pub fn write(binary: &Path, reference: &str, out: &Path) -> Result<Written> {
    let data = std::fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    if !data.starts_with(b"\x7fELF") {
        bail!("{} is not an ELF binary", binary.display());
    }
    let (bytes, written) = archive(&data, reference)?;
    let tmp = out.with_extension("tmp");
    std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, out)?;
    Ok(written)
}

/// The `Containerfile`'s final stage, as the fields the image config also has: entrypoint,
/// environment, user, labels and copies. Reads only the instructions this project's
/// Containerfile uses (JSON-form ENTRYPOINT, `ENV k=v`, `USER`, `LABEL k="v"`, `COPY … dst`,
/// `\` continuations): the five instructions compared, not a Dockerfile parser.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FinalStage {
    pub from: String,
    pub entrypoint: Vec<String>,
    pub env: Vec<String>,
    pub user: Option<String>,
    pub labels: Vec<(String, String)>,
    /// Destinations of its COPY instructions.
    pub copies: Vec<String>,
}

pub fn containerfile_final_stage(text: &str) -> Result<FinalStage> {
    // Join continuation lines, drop comments.
    let mut lines = Vec::new();
    let mut cur = String::new();
    for raw in text.lines() {
        let l = raw.trim();
        if l.starts_with('#') || (l.is_empty() && cur.is_empty()) {
            continue;
        }
        if let Some(head) = l.strip_suffix('\\') {
            cur.push_str(head);
            cur.push(' ');
        } else {
            cur.push_str(l);
            lines.push(std::mem::take(&mut cur));
        }
    }
    let mut stage = FinalStage::default();
    for l in lines {
        let (op, rest) = l.split_once(char::is_whitespace).unwrap_or((&l, ""));
        let rest = rest.trim();
        match op.to_ascii_uppercase().as_str() {
            "FROM" => {
                stage = FinalStage {
                    from: rest.to_string(),
                    ..FinalStage::default()
                }
            }
            "ENTRYPOINT" => {
                stage.entrypoint = serde_json::from_str(rest)
                    .with_context(|| format!("Containerfile: ENTRYPOINT {rest} is not JSON"))?
            }
            "ENV" => stage.env.push(rest.to_string()),
            "USER" => stage.user = Some(rest.to_string()),
            "COPY" => stage
                .copies
                .extend(rest.split_whitespace().last().map(str::to_string)),
            "LABEL" => {
                let mut s = rest;
                while !s.is_empty() {
                    let Some((k, v)) = s.split_once('=') else {
                        bail!("Containerfile: LABEL {rest} is not key=\"value\"");
                    };
                    let v = v.trim_start();
                    let Some(v) = v.strip_prefix('"') else {
                        bail!("Containerfile: label {k} is not quoted");
                    };
                    let Some((value, tail)) = v.split_once('"') else {
                        bail!("Containerfile: label {k} is not closed");
                    };
                    stage.labels.push((k.trim().to_string(), value.to_string()));
                    s = tail.trim_start();
                }
            }
            _ => {}
        }
    }
    stage.labels.sort();
    Ok(stage)
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    /// The archive's entries: path → (mode, contents).
    fn entries(tar: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut a = tar::Archive::new(tar);
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let path = e.path().unwrap().to_string_lossy().into_owned();
                let mode = e.header().mode().unwrap();
                let (uid, mtime) = (e.header().uid().unwrap(), e.header().mtime().unwrap());
                assert_eq!((uid, mtime), (0, 0), "{path}: uid {uid}, mtime {mtime}");
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (path, mode, data)
            })
            .collect()
    }

    fn file<'a>(all: &'a [(String, u32, Vec<u8>)], path: &str) -> &'a [u8] {
        &all.iter()
            .find(|(p, ..)| p == path)
            .unwrap_or_else(|| panic!("{path} missing from the archive"))
            .2
    }

    fn json(data: &[u8]) -> serde_json::Value {
        serde_json::from_slice(data).unwrap()
    }

    const BIN: &[u8] = b"\x7fELF a static binary, as far as this test cares";

    #[test]
    fn the_same_binary_gives_the_same_bytes_and_another_binary_another_digest() {
        let (a, wa) = archive(BIN, "r.example/ra:1").unwrap();
        let (b, wb) = archive(BIN, "r.example/ra:1").unwrap();
        assert_eq!(a, b);
        assert_eq!(wa, wb);
        let (_, wc) = archive(b"\x7fELF another binary", "r.example/ra:1").unwrap();
        assert_ne!(wa.digest, wc.digest);
        assert_ne!(wa.config, wc.config);
    }

    #[test]
    fn every_blob_is_named_by_its_digest_and_both_indexes_lead_to_the_binary() {
        let (bytes, w) = archive(BIN, "r.example/ra:1.2").unwrap();
        assert_eq!(w.archive_bytes, bytes.len() as u64);
        let all = entries(&bytes);
        for (path, _, data) in &all {
            if let Some(hex) = path.strip_prefix("blobs/sha256/")
                && !hex.is_empty()
            {
                assert_eq!(hex, sha256(data), "{path}");
            }
        }
        assert_eq!(
            json(file(&all, "oci-layout")),
            serde_json::json!({"imageLayoutVersion": "1.0.0"})
        );
        // OCI: index.json → manifest → config and layer.
        let index = json(file(&all, "index.json"));
        let m = &index["manifests"][0];
        assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
        assert_eq!(m["mediaType"], "application/vnd.oci.image.manifest.v1+json");
        assert_eq!(m["digest"], w.digest.as_str());
        assert_eq!(
            m["annotations"]["io.containerd.image.name"],
            "r.example/ra:1.2"
        );
        assert_eq!(m["annotations"]["org.opencontainers.image.ref.name"], "1.2");
        let blob = |d: &serde_json::Value| {
            let hex = d["digest"]
                .as_str()
                .unwrap()
                .strip_prefix("sha256:")
                .unwrap();
            let data = file(&all, &format!("blobs/sha256/{hex}"));
            assert_eq!(d["size"].as_u64().unwrap(), data.len() as u64);
            data
        };
        let manifest = json(blob(m));
        assert_eq!(manifest["schemaVersion"], 2);
        assert_eq!(manifest["config"]["digest"], w.config.as_str());
        let config = json(blob(&manifest["config"]));
        let layers = manifest["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 1);
        assert_eq!(
            layers[0]["mediaType"],
            "application/vnd.oci.image.layer.v1.tar"
        );
        let layer = blob(&layers[0]);
        // An uncompressed layer: its diff id is its digest.
        assert_eq!(config["rootfs"]["diff_ids"][0], layers[0]["digest"]);
        assert_eq!(
            (config["os"].as_str(), config["architecture"].as_str()),
            (Some("linux"), Some("amd64"))
        );
        assert_eq!(config["config"]["Entrypoint"], serde_json::json!([BINARY]));
        assert_eq!(config["config"]["Env"], serde_json::json!([PATH]));
        assert!(config["config"].get("User").is_none(), "{config}");
        // docker-archive: manifest.json names the same config and layer.
        let docker = json(file(&all, "manifest.json"));
        assert_eq!(
            docker[0]["RepoTags"],
            serde_json::json!(["r.example/ra:1.2"])
        );
        assert_eq!(
            docker[0]["Config"].as_str().unwrap(),
            format!("blobs/sha256/{}", w.config.strip_prefix("sha256:").unwrap())
        );
        assert_eq!(
            docker[0]["Layers"][0].as_str().unwrap(),
            format!(
                "blobs/sha256/{}",
                layers[0]["digest"]
                    .as_str()
                    .unwrap()
                    .strip_prefix("sha256:")
                    .unwrap()
            )
        );
        // The layer: the binary, executable, and its directories; nothing else.
        let files = entries(layer);
        let paths: Vec<(&str, u32)> = files.iter().map(|(p, m, _)| (p.as_str(), *m)).collect();
        assert_eq!(
            paths,
            [
                ("usr/", 0o755),
                ("usr/local/", 0o755),
                ("usr/local/bin/", 0o755),
                ("usr/local/bin/routing-agent", 0o755)
            ]
        );
        assert_eq!(files[3].2, BIN);
        assert_eq!(w.layer_bytes, layer.len() as u64);
    }

    #[test]
    fn a_reference_without_a_tag_is_refused() {
        for bad in ["r.example/ra", "ra:", "r.example:5000/ra"] {
            let e = archive(BIN, bad).unwrap_err().to_string();
            assert!(e.contains("repository:tag"), "{bad}: {e}");
        }
    }

    /// `Containerfile` and `cargo xtask image` make the same image: its final stage starts
    /// from nothing, puts the static binary where the image has it, and declares the same
    /// entrypoint, environment, user (none: root) and labels.
    #[test]
    fn the_containerfile_declares_what_xtask_image_writes() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../Containerfile");
        let text = std::fs::read_to_string(path).unwrap();
        let stage = containerfile_final_stage(&text).unwrap();
        assert_eq!(stage.from, "scratch");
        assert_eq!(stage.entrypoint, [BINARY]);
        assert_eq!(stage.env, [PATH]);
        assert_eq!(stage.user, None);
        let mut want: Vec<(String, String)> = labels()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        want.sort();
        assert_eq!(stage.labels, want);
        assert_eq!(stage.copies, [BINARY]);
        // Both link the binary the same way (no libc in the image).
        assert!(
            text.contains(STATIC_RUSTFLAGS),
            "the Containerfile does not build with {STATIC_RUSTFLAGS}"
        );
    }
}
