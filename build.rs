//! Compiles `proto/` into Rust with protox (a pure-Rust protobuf compiler), so building Ferry
//! never needs `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/ferry/v1/events.proto",
        "proto/shop/v1/products.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(protos, ["proto"])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
