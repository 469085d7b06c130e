//! Push throughput and memory, side by side with the peer tools, against the
//! same real containerd and a freshly started registry.
//!
//! ```sh
//! WITH_BENCH_TOOLS=1 tests/setup
//! cargo build --release -p image-backup-agent && cargo bench -p image-backup-tests --bench push
//! ```
//!
//! For each image: `image-backup-agent push` (containerd -> registry), the
//! registry's own ingest floor (4 parallel monolithic `curl` uploads of the
//! same blobs, straight from containerd's content directory), `ctr images
//! push` (same image, same registry), and `skopeo copy` (registry ->
//! registry); the target registry is emptied between runs. Then the
//! agent's second push of an image already there. Peak RSS is the
//! process's own, so it covers the whole agent. `BENCH_IMAGES=256MB` runs
//! the first image only.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use image_backup_agent::{
    containerd::{ContainerdStore, ReadPath},
    progress::Progress,
    push::{PushOptions, Pusher, Scope, SourceAccess},
};
use image_backup_oci::{ImageRef, registry::RegistryConfig};
use image_backup_tests::{Containerd, MediaTypes, Registry, RegistryAuth, TestImage, containerd::NAMESPACE};

const MB: usize = 1 << 20;

struct Run {
    elapsed: Duration,
    max_rss_kb: i64,
}

/// Runs a command to completion under GNU time, returning its wall time
/// and peak RSS. (wait4's rusage would not do: Linux carries the forking
/// parent's high-water mark across exec, and this process holds the test
/// images in memory.)
fn measured(command: &mut Command) -> anyhow::Result<Run> {
    let mut timed = Command::new("/usr/bin/time");
    timed.args(["-f", "image-backup-bench-rss-kb=%M"]).arg(command.get_program()).args(command.get_args());
    let started = Instant::now();
    let output = timed.stdout(std::process::Stdio::null()).output().context("running /usr/bin/time (package time)")?;
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!("{command:?} failed: {stderr}");
    }
    let max_rss_kb = stderr
        .lines()
        .find_map(|l| l.strip_prefix("image-backup-bench-rss-kb="))
        .and_then(|v| v.trim().parse().ok())
        .context("no peak RSS in /usr/bin/time output")?;
    Ok(Run { elapsed, max_rss_kb })
}

/// Empties the target registry and flushes the previous run's writes, so
/// that no run pays for another's disk writeback.
fn fresh(registry: &Registry) -> anyhow::Result<()> {
    registry.clear()?;
    let status = Command::new("sync").status()?;
    if !status.success() {
        bail!("sync failed");
    }
    Ok(())
}

fn median(mut runs: Vec<Run>) -> Run {
    runs.sort_by_key(|r| r.elapsed);
    let mid = runs.len() / 2;
    let max_rss_kb = runs.iter().map(|r| r.max_rss_kb).max().unwrap_or(0);
    Run { elapsed: runs.swap_remove(mid).elapsed, max_rss_kb }
}

fn agent_binary() -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var("IMAGE_BACKUP_AGENT_BIN") {
        return Ok(path.into());
    }
    // target/release/deps/push-HASH -> target/release/image-backup-agent
    let exe = std::env::current_exe()?;
    let path = exe.parent().and_then(Path::parent).context("bench binary location")?.join("image-backup-agent");
    if !path.exists() {
        bail!("{} not found: run `cargo build --release -p image-backup-agent` first", path.display());
    }
    Ok(path)
}

/// One monolithic blob upload: `upload.sh BASE HOST FILE DIGEST`.
const CURL_UPLOAD: &str = r#"set -e
loc=$(curl -sf -o /dev/null -D - -X POST "$1/blobs/uploads/" | tr -d '\r' | sed -n 's/^[Ll]ocation: //p')
case "$loc" in /*) loc="http://$2$loc";; esac
case "$loc" in *\?*) sep='&';; *) sep='?';; esac
curl -sf -o /dev/null -X PUT -H 'Content-Type: application/octet-stream' -T "$3" "$loc${sep}digest=$4"
"#;

/// The registry's ingest floor: each blob of `image` uploaded
/// monolithically by its own `curl`, four at once (as the agent does), read
/// straight from containerd's content directory: no digest checks and no
/// containerd API, just the bytes into the same registry; the manifest last.
fn curl_uploads(script: &Path, containerd: &Containerd, registry: &Registry, image: &TestImage) -> Command {
    let host = registry.host();
    let base = format!("http://{host}/v2/curl");
    let platform = &image.platforms[0];
    let jobs: String = platform
        .layers
        .iter()
        .chain([&platform.config])
        .map(|b| format!("{} {}\n", containerd.blob_path(&b.digest).display(), b.digest))
        .collect();
    let manifest = containerd.blob_path(&platform.manifest.digest);
    let pipeline = format!(
        "printf '{jobs}' | xargs -P 4 -n 2 sh {script} {base} {host} && \
         curl -sf -o /dev/null -X PUT -H 'Content-Type: {media_type}' -T {manifest} {base}/manifests/1",
        script = script.display(),
        media_type = platform.manifest.media_type,
        manifest = manifest.display(),
    );
    let mut command = Command::new("sh");
    command.arg("-c").arg(pipeline);
    command
}

fn has(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success())
}

fn row(tool: &str, image: &str, bytes: u64, run: &Run) {
    let mbps = bytes as f64 / 1e6 / run.elapsed.as_secs_f64();
    println!(
        "{tool:<28} {image:<14} {:>9.1} ms {:>9.1} MB/s {:>9.1} MB peak RSS",
        run.elapsed.as_secs_f64() * 1e3,
        mbps,
        run.max_rss_kb as f64 / 1024.0
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::var("BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let agent = agent_binary()?;
    let containerd = Containerd::start().await?;
    let target = Registry::start(RegistryAuth::None).await?;
    let source = Registry::start(RegistryAuth::None).await?;
    let mut images = vec![
        ("256MB/4", TestImage::single(MediaTypes::Oci, &[64 * MB; 4], 256)),
        ("1GB/8", TestImage::single(MediaTypes::Oci, &[128 * MB; 8], 1024)),
    ];
    if std::env::var("BENCH_IMAGES").is_ok_and(|v| v == "256MB") {
        images.truncate(1);
    }
    let script = std::env::temp_dir().join(format!("image-backup-bench-upload-{}.sh", std::process::id()));
    std::fs::write(&script, CURL_UPLOAD)?;
    println!("image-backup push benchmark: {runs} run(s) each, median time, max peak RSS");
    println!("{:<28} {:<14} {:>12} {:>14} {:>18}", "tool", "image", "time", "throughput", "memory");
    for (label, image) in &images {
        let name = format!("docker.io/library/bench-{}:1", image.total_size());
        image.import(&containerd, &name, &[], &[]).await?;
        let bytes = image.total_size();
        let agent_push = |repo: &str, registry: &Registry| {
            let mut command = Command::new(&agent);
            command
                .arg("push")
                .arg("--containerd")
                .arg(containerd.socket())
                .arg("--namespace")
                .arg(NAMESPACE)
                .arg("--insecure-registry")
                .arg(registry.host())
                .arg(&name)
                .arg(format!("{}/{repo}:1", registry.host()));
            command
        };

        let mut ours = Vec::new();
        for _ in 0..runs {
            fresh(&target)?;
            ours.push(measured(&mut agent_push("bench", &target))?);
        }
        let ours = median(ours);
        row("image-backup-agent push", label, bytes, &ours);

        if has("curl") {
            let mut floor = Vec::new();
            for _ in 0..runs {
                fresh(&target)?;
                floor.push(measured(&mut curl_uploads(&script, &containerd, &target, image))?);
            }
            let floor = median(floor);
            row("4 parallel curl uploads", label, bytes, &floor);
            println!(
                "  agent / curl floor: {:.3} of the registry's ingest",
                floor.elapsed.as_secs_f64() / ours.elapsed.as_secs_f64()
            );
        } else {
            println!("curl uploads: curl not installed (WITH_BENCH_TOOLS=1 tests/setup)");
        }

        let mut grpc = Vec::new();
        for _ in 0..runs {
            fresh(&target)?;
            grpc.push(measured(agent_push("bench", &target).args(["--content-read", "grpc"]))?);
        }
        row("  via Content service", label, bytes, &median(grpc));

        let mut second = Vec::new();
        for _ in 0..runs {
            second.push(measured(&mut agent_push("bench", &target))?);
        }
        row("  second push, fresh process", label, bytes, &median(second));

        // What a running agent pays for a job whose image is already backed
        // up: its connections are open and the reference grammar compiled
        // (about 30 ms of a fresh process's start).
        let store =
            ContainerdStore::connect(&containerd.socket(), NAMESPACE).await?.with_read_path(ReadPath::Auto).await;
        let config = RegistryConfig { insecure_hosts: vec![target.host()], ..RegistryConfig::default() };
        let pusher = Pusher::new(store, config, PushOptions::default());
        let (src, dst) = (ImageRef::parse(&name)?, ImageRef::parse(&format!("{}/bench:1", target.host()))?);
        pusher.push(&src, &dst, &Scope::Whole, SourceAccess::default(), Progress::new()).await?;
        let mut warm = Vec::new();
        for _ in 0..runs.max(5) {
            let started = Instant::now();
            pusher.push(&src, &dst, &Scope::Whole, SourceAccess::default(), Progress::new()).await?;
            warm.push(Run { elapsed: started.elapsed(), max_rss_kb: 0 });
        }
        row("  second push, running agent", label, bytes, &median(warm));

        if has("ctr") {
            let mut ctr = Vec::new();
            for _ in 0..runs {
                fresh(&target)?;
                let mut command = Command::new("ctr");
                command
                    .arg("--address")
                    .arg(containerd.socket())
                    .args(["--namespace", NAMESPACE, "images", "push", "--plain-http"])
                    .arg(format!("{}/ctr:1", target.host()))
                    .arg(&name);
                ctr.push(measured(&mut command)?);
            }
            row("ctr images push", label, bytes, &median(ctr));
        } else {
            println!("ctr images push: ctr not installed");
        }

        if has("skopeo") {
            fresh(&source)?;
            measured(&mut agent_push("src", &source))?;
            let mut skopeo = Vec::new();
            for _ in 0..runs {
                fresh(&target)?;
                let mut command = Command::new("skopeo");
                command
                    .args(["copy", "--src-tls-verify=false", "--dest-tls-verify=false", "--quiet"])
                    .arg(format!("docker://{}/src:1", source.host()))
                    .arg(format!("docker://{}/skopeo:1", target.host()));
                skopeo.push(measured(&mut command)?);
            }
            row("skopeo copy (reg -> reg)", label, bytes, &median(skopeo));
        } else {
            println!("skopeo copy: skopeo not installed (WITH_BENCH_TOOLS=1 tests/setup)");
        }
    }
    let _ = std::fs::remove_file(&script);
    target.clear()?;
    source.clear()?;
    Ok(())
}
