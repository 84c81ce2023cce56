//! The `fedee-aggregator` binary: its help teaches the flags, and it does not load libtorch
//! (the crate's invariant, checked on the linked binary).

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_fedee-aggregator");

#[test]
fn help_lists_the_aggregator_flags() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--initial-model",
        "--min-sites",
        "--tls-dir",
        "--clipping-norm",
        "--enroll",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
}

#[test]
fn refuses_to_start_without_transport_security() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .current_dir(dir.path())
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--tls-dir") && err.contains("--insecure"),
        "{err}"
    );
}

#[test]
fn does_not_link_libtorch() {
    let out = Command::new("ldd")
        .arg(BIN)
        .output()
        .expect("ldd (libc-bin) runs");
    assert!(out.status.success(), "ldd failed: {out:?}");
    let libs = String::from_utf8(out.stdout).unwrap();
    assert!(libs.contains("libc.so"), "ldd output has no libc:\n{libs}");
    assert!(
        !libs.contains("libtorch") && !libs.contains("libc10"),
        "{libs}"
    );
}
