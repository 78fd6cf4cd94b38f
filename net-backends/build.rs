fn main() {
    // libslirp (Debian's libslirp-dev), the user-mode network stack QEMU uses.
    println!("cargo:rustc-link-lib=slirp");
}
