//! The CRD as the API server enforces it: every example is accepted, every bad manifest is refused
//! with a message that names the field.

use std::path::Path;

use testkit::control_plane::{ensure_crds, kubectl, manifest, ok, repo};

fn yaml_files(dir: &str) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(Path::new(repo()).join(dir))
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|entry| entry.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[tokio::test]
async fn the_crd_is_structural_and_every_example_is_accepted() {
    ensure_crds().await;
    let conditions = ok(
        "read the CRD's conditions",
        kubectl(&[
            "get",
            "crd",
            "rabbitclusters.warren.dev",
            "-o",
            "jsonpath={range .status.conditions[*]}{.type}={.status} {end}",
        ]),
    );
    assert!(conditions.contains("Established=True"), "CRD not established: {conditions}");
    assert!(!conditions.contains("NonStructuralSchema=True"), "CRD schema not structural: {conditions}");

    let examples = yaml_files("examples");
    assert!(examples.len() >= 3, "examples/ has {} manifests", examples.len());
    for file in examples {
        let path = file.to_string_lossy();
        let out = ok(
            &format!("server-side dry run of {path}"),
            kubectl(&["apply", "--dry-run=server", "--validate=strict", "-n", "default", "-f", &path]),
        );
        assert!(out.contains("created (server dry run)"), "{path}: {out}");
    }
}

#[tokio::test]
async fn bad_manifests_are_rejected_naming_the_field() {
    ensure_crds().await;
    let files = yaml_files("e2e/bad-manifests");
    assert!(files.len() >= 10, "e2e/bad-manifests has {} manifests", files.len());
    for file in files {
        let text = manifest(&file);
        let expected = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# rejected: "))
            .unwrap_or_else(|| panic!("{}: first line must be `# rejected: <message>`", file.display()));
        let out = kubectl(&[
            "apply",
            "--dry-run=server",
            "--validate=strict",
            "-n",
            "default",
            "-f",
            &file.to_string_lossy(),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{} was accepted: {}", file.display(), String::from_utf8_lossy(&out.stdout));
        assert!(
            stderr.contains(expected),
            "{}: the API server's refusal does not say `{expected}`:\n{stderr}",
            file.display()
        );
    }
}
