use image_backup_tests::*;
#[tokio::test]
#[ignore]
async fn scratch_env() {
    let c = Containerd::start().await.unwrap();
    let r = Registry::start(RegistryAuth::None).await.unwrap();
    let image = TestImage::single(MediaTypes::Oci, &[64 << 20; 4], 256);
    image.import(&c, "docker.io/library/big:1", &[], &[]).await.unwrap();
    std::fs::write(
        "/tmp/scratch.env",
        format!("SOCK={}\nREG={}\nDATA={}\n", c.socket().display(), r.host(), r.data_dir().display()),
    )
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(1500)).await;
}
