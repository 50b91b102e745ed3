//! Keeps compliance/requirements.toml honest: every requirement names at least one test, and
//! every named test exists as a test function in the named file.

use std::path::Path;

use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Requirements {
    requirement: Vec<Requirement>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Requirement {
    id: String,
    statement: String,
    source: Vec<String>,
    tests: Vec<String>,
}

/// Why a test reference does not resolve, if it does not.
fn check_test_reference(root: &Path, reference: &str) -> Result<(), String> {
    let (file, function) = reference
        .rsplit_once("::")
        .ok_or_else(|| format!("{reference}: expected <file>::<test>"))?;
    let text = std::fs::read_to_string(root.join(file))
        .map_err(|_| format!("{reference}: no file {file}"))?;
    let lines: Vec<&str> = text.lines().collect();
    let signature = format!("fn {function}(");
    let position = lines
        .iter()
        .position(|line| {
            line.trim_start().starts_with(&signature)
                || line.contains(&format!("async {signature}"))
        })
        .ok_or_else(|| format!("{reference}: no function {function} in {file}"))?;
    let attributes = &lines[position.saturating_sub(3)..position];
    if attributes
        .iter()
        .any(|line| line.contains("#[test]") || line.contains("#[tokio::test"))
    {
        Ok(())
    } else {
        Err(format!("{reference}: {function} is not a test"))
    }
}

#[test]
fn every_requirement_names_tests_that_exist() {
    let root = medai_testkit::workspace_root();
    let text = std::fs::read_to_string(root.join("compliance/requirements.toml"))
        .expect("requirements file");
    let requirements: Requirements = toml::from_str(&text).expect("valid requirements file");
    assert!(!requirements.requirement.is_empty());
    let mut ids = std::collections::BTreeSet::new();
    let mut problems = Vec::new();
    for requirement in &requirements.requirement {
        assert!(
            ids.insert(requirement.id.clone()),
            "duplicate id {}",
            requirement.id
        );
        assert!(
            !requirement.statement.is_empty() && !requirement.source.is_empty(),
            "{} lacks a statement or source",
            requirement.id
        );
        if requirement.tests.is_empty() {
            problems.push(format!("{} names no test", requirement.id));
        }
        for reference in &requirement.tests {
            if let Err(problem) = check_test_reference(&root, reference) {
                problems.push(format!("{}: {problem}", requirement.id));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "compliance traceability is broken:\n{}",
        problems.join("\n")
    );
}

#[test]
fn a_reference_to_a_missing_or_non_test_function_is_caught() {
    let root = medai_testkit::workspace_root();
    assert!(
        check_test_reference(
            &root,
            "tests/tests/compliance.rs::every_requirement_names_tests_that_exist"
        )
        .is_ok()
    );
    assert!(check_test_reference(&root, "tests/tests/compliance.rs::no_such_test").is_err());
    assert!(
        check_test_reference(&root, "tests/tests/compliance.rs::check_test_reference").is_err(),
        "a helper is not a test"
    );
    assert!(check_test_reference(&root, "tests/tests/nowhere.rs::anything").is_err());
    assert!(check_test_reference(&root, "no separator").is_err());
}
