//! Compiles `proto/` into Rust with protox (a pure-Rust protobuf compiler), so building Ferry
//! never needs `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/ferry/v1/events.proto",
        "proto/shop/v1/products.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    // `sqlx::migrate!` embeds `migrations/`: a migration added or changed must rebuild it.
    println!("cargo:rerun-if-changed=migrations");
    let descriptors = protox::compile(protos, ["proto"])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
