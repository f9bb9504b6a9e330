//! Puts the git commit into the binary (`mozaiks --version`, `mozaiks_build_info`):
//! `MOZAIKS_GIT_COMMIT` when the build sets it (an image built without `.git`), else
//! `git rev-parse --short=12 HEAD`, else `unknown`.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=MOZAIKS_GIT_COMMIT");
    let commit = std::env::var("MOZAIKS_GIT_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(git_commit)
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=MOZAIKS_GIT_COMMIT={}", commit.trim());
}

fn git_commit() -> Option<String> {
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git").args(args).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    // Rebuilt when HEAD moves: the file HEAD names (a branch) and HEAD itself.
    // (A path that does not exist would rerun this script on every build: only existing ones.)
    let watch = |path: Option<String>| {
        if let Some(p) = path.filter(|p| std::path::Path::new(p).exists()) {
            println!("cargo:rerun-if-changed={p}");
        }
    };
    watch(git(&["rev-parse", "--git-path", "HEAD"]));
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watch(git(&["rev-parse", "--git-path", &branch]));
    }
    watch(git(&["rev-parse", "--git-path", "packed-refs"]));
    git(&["rev-parse", "--short=12", "HEAD"])
}
