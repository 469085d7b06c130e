//! Writes the ImageBackup CRD manifest to `deploy/crds/imagebackup.yaml`
//! (or to the path given as the first argument, `-` for stdout).

use std::{env, fs, path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let yaml = match image_backup_crds::crd_yaml() {
        Ok(yaml) => yaml,
        Err(err) => {
            eprintln!("crdgen: serializing the CRD: {err}");
            return ExitCode::FAILURE;
        }
    };
    let target = env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds/imagebackup.yaml"));
    if target.as_os_str() == "-" {
        print!("{yaml}");
        return ExitCode::SUCCESS;
    }
    if let Err(err) = fs::write(&target, yaml) {
        eprintln!("crdgen: writing {}: {err}", target.display());
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
