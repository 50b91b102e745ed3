//! Puts the commit this build came from into `MEDAI_BUILD_COMMIT` for `medai_build_info`:
//! the variable of that name when the build sets it (an image built without `.git`), else
//! `git rev-parse`, else "unknown". Reruns when HEAD moves, so the label follows the checkout.
use std::process::Command;

fn git(arguments: &[&str]) -> Option<String> {
    let output = Command::new("git").args(arguments).output().ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?.trim().to_owned();
    (!text.is_empty()).then_some(text)
}

fn main() {
    println!("cargo:rerun-if-env-changed=MEDAI_BUILD_COMMIT");
    let commit = std::env::var("MEDAI_BUILD_COMMIT")
        .ok()
        .filter(|commit| !commit.trim().is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_owned());
    // HEAD itself (a checkout) and the branch it names (a commit) both move the commit.
    for path in [
        git(&["rev-parse", "--git-path", "HEAD"]),
        git(&["rev-parse", "--symbolic-full-name", "HEAD"])
            .and_then(|reference| git(&["rev-parse", "--git-path", &reference])),
        git(&["rev-parse", "--git-path", "packed-refs"]),
    ]
    .into_iter()
    .flatten()
    {
        if std::path::Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    println!("cargo:rustc-env=MEDAI_BUILD_COMMIT={commit}");
}
