//! Compile-time behaviour of `#[idempotent]` (trybuild): every option and
//! key source compiles (`tests/ui/pass`), and every mistake fails with the
//! checked-in message at the offending token (`tests/ui/fail/*.stderr`).
//! After an intended change of wording, regenerate with
//! `TRYBUILD=overwrite cargo test --test macro_ui` and review the diff.

#[test]
fn ui() {
    let cases = trybuild::TestCases::new();
    cases.pass("tests/ui/pass/*.rs");
    cases.compile_fail("tests/ui/fail/*.rs");
}
