//! Expansion tests of `#[service]`: good traits compile (and their
//! generated items behave), bad ones fail with a clear message at the right
//! span. The expected messages are in `tests/ui/fail/*.stderr`; regenerate
//! them with `TRYBUILD=overwrite cargo test -p meshwork-rpc --test macro`
//! and read the diff (they depend on the compiler version: the toolchain is
//! pinned).

#[test]
fn good_traits_compile() {
    trybuild::TestCases::new().pass("tests/ui/pass/*.rs");
}

#[test]
fn bad_traits_fail_with_a_clear_message() {
    trybuild::TestCases::new().compile_fail("tests/ui/fail/*.rs");
}

/// Argument names the expansion uses for its own locals (`codec`, `args`)
/// must not break it.
#[test]
fn argument_names_are_not_captured_by_the_expansion() {
    trybuild::TestCases::new().pass("tests/ui/hygiene/*.rs");
}
