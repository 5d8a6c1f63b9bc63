fn main() {
    eprintln!("vfio-multifd: under construction");
    std::process::exit(1);
}
