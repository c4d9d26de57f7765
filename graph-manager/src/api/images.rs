//! `blkmesh.v1.ImageService`: creating image files and describing images
//! or a node's chain (`qemu-img create` and `qemu-img info`), with
//! blkmesh-image. Files are touched on the blocking pool, outside the
//! manager's lock.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blkmesh_graph::kinds::qcow2::LayerFormat;
use blkmesh_graph::GraphError;
use blkmesh_image::{CreateOptions, Format, ImageError, Preallocation};
use blkmesh_proto::v1::get_image_info_request::Target;
use blkmesh_proto::v1::image_service_server::ImageService;
use blkmesh_proto::v1::{
    self as pb, CreateImageRequest, CreateImageResponse, GetImageInfoRequest, GetImageInfoResponse,
    ImageInfo,
};
use tonic::{Request, Response, Status};

use crate::control::hub::Control;
use crate::core::error::ApiError;

/// `blkmesh.v1.ImageService`.
pub(crate) struct ImageApi(pub Arc<Control>);

fn invalid(field: &'static str, problem: impl Into<String>) -> Status {
    Status::from(ApiError::from(GraphError::invalid(field, problem)))
}

/// An image error as the API reports it: the path exists (ALREADY_EXISTS),
/// or what is wrong with the request or the file (INVALID_ARGUMENT).
fn image_status(field: &'static str, e: ImageError) -> Status {
    if e.errno() == libc::EEXIST {
        Status::already_exists(format!("{field}: {e}"))
    } else {
        invalid(field, e.to_string())
    }
}

fn absolute(field: &'static str, path: &str) -> Result<PathBuf, Status> {
    if !path.starts_with('/') || path.contains('\0') || path.len() > 4096 {
        return Err(invalid(
            field,
            format!("must be an absolute path of at most 4096 bytes (got {path:?})"),
        ));
    }
    Ok(PathBuf::from(path))
}

fn format_of(field: &'static str, f: i32) -> Result<Format, Status> {
    match pb::ImageFormat::try_from(f) {
        Ok(pb::ImageFormat::Qcow2) => Ok(Format::Qcow2),
        Ok(pb::ImageFormat::Raw) => Ok(Format::Raw),
        _ => Err(invalid(field, "must be qcow2 or raw")),
    }
}

fn pb_format(f: Format) -> i32 {
    match f {
        Format::Qcow2 => pb::ImageFormat::Qcow2 as i32,
        Format::Raw => pb::ImageFormat::Raw as i32,
    }
}

fn pb_info(i: blkmesh_image::ImageInfo, node: &str) -> ImageInfo {
    ImageInfo {
        path: i.path.display().to_string(),
        format: pb_format(i.format),
        virtual_size: i.virtual_size,
        disk_size: i.disk_size,
        cluster_size: i.cluster_size,
        backing_file: i.backing_file.unwrap_or_default(),
        backing_format: i.backing_format.unwrap_or_default(),
        allocated: i.allocated,
        node: node.to_string(),
    }
}

/// The options of a CreateImage request, checked.
fn create_options(r: &CreateImageRequest) -> Result<(PathBuf, CreateOptions), Status> {
    let path = absolute("path", &r.path)?;
    let format = format_of("format", r.format)?;
    let backing = match r.backing_file.as_str() {
        "" => None,
        name => Some((
            name.to_string(),
            format_of("backing_format", r.backing_format)?,
        )),
    };
    let preallocation = match pb::Preallocation::try_from(r.preallocation) {
        Ok(pb::Preallocation::Off) => Preallocation::Off,
        Ok(pb::Preallocation::Metadata) => Preallocation::Metadata,
        Err(_) => return Err(invalid("preallocation", "must be off or metadata")),
    };
    let opts = CreateOptions {
        format,
        size: r.size,
        cluster_size: r.cluster_size,
        backing,
        preallocation,
    };
    Ok((path, opts))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("image task: {e}")))?
}

fn create_owned(
    path: &Path,
    opts: &CreateOptions,
    owner: Option<(u32, u32)>,
) -> Result<ImageInfo, Status> {
    blkmesh_image::create(path, opts).map_err(|e| image_status("path", e))?;
    if let Some((uid, gid)) = owner {
        if let Err(e) = std::os::unix::fs::chown(path, Some(uid), Some(gid)) {
            let _ = std::fs::remove_file(path);
            return Err(invalid(
                "path",
                format!("cannot give {path:?} to {uid}:{gid}: {e}"),
            ));
        }
    }
    let info = blkmesh_image::info_as(path, opts.format).map_err(|e| image_status("path", e))?;
    Ok(pb_info(info, ""))
}

#[tonic::async_trait]
impl ImageService for ImageApi {
    async fn create_image(
        &self,
        request: Request<CreateImageRequest>,
    ) -> Result<Response<CreateImageResponse>, Status> {
        let (path, opts) = create_options(&request.into_inner())?;
        let owner = self.0.image_owner.get().copied();
        let image = blocking(move || create_owned(&path, &opts, owner)).await?;
        tracing::info!(path = %image.path, size = image.virtual_size, "image created");
        Ok(Response::new(CreateImageResponse { image: Some(image) }))
    }

    async fn get_image_info(
        &self,
        request: Request<GetImageInfoRequest>,
    ) -> Result<Response<GetImageInfoResponse>, Status> {
        let layers: Vec<(PathBuf, Option<Format>, String)> = match request.into_inner().target {
            None => return Err(invalid("target", "must be a path or a node")),
            Some(Target::Path(p)) => vec![(absolute("path", &p)?, None, String::new())],
            Some(Target::Node(name)) => self
                .0
                .image_layers(&name)?
                .into_iter()
                .map(|l| {
                    let f = match l.format {
                        LayerFormat::Qcow2 => Format::Qcow2,
                        LayerFormat::Raw => Format::Raw,
                    };
                    (PathBuf::from(l.path), Some(f), l.node)
                })
                .collect(),
        };
        let chain = blocking(move || {
            layers
                .into_iter()
                .map(|(path, format, node)| {
                    let info = match format {
                        Some(f) => blkmesh_image::info_as(&path, f),
                        None => blkmesh_image::info(&path),
                    };
                    info.map(|i| pb_info(i, &node))
                        .map_err(|e| image_status("target", e))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await?;
        Ok(Response::new(GetImageInfoResponse { chain }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(path: &str) -> CreateImageRequest {
        CreateImageRequest {
            path: path.into(),
            format: pb::ImageFormat::Qcow2 as i32,
            size: 1 << 20,
            ..Default::default()
        }
    }

    #[test]
    fn create_requests_are_checked_field_by_field() {
        let field_of = |r: CreateImageRequest| {
            let e = create_options(&r).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
            e.message()
                .split(':')
                .next()
                .unwrap_or_default()
                .to_string()
        };
        assert_eq!(field_of(request("relative.qcow2")), "path");
        assert_eq!(
            field_of(CreateImageRequest {
                format: 0,
                ..request("/a")
            }),
            "format"
        );
        assert_eq!(
            field_of(CreateImageRequest {
                backing_file: "/b".into(),
                ..request("/a")
            }),
            "backing_format"
        );
        assert_eq!(
            field_of(CreateImageRequest {
                preallocation: 7,
                ..request("/a")
            }),
            "preallocation"
        );
        create_options(&request("/a")).unwrap();
    }

    #[test]
    fn an_existing_path_is_already_exists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.qcow2");
        let (_, opts) = create_options(&request(path.to_str().unwrap())).unwrap();
        let info = create_owned(&path, &opts, None).unwrap();
        assert_eq!(info.virtual_size, 1 << 20);
        let e = create_owned(&path, &opts, None).unwrap_err();
        assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
        let bad = CreateOptions { size: 100, ..opts };
        let e = create_owned(&dir.path().join("y"), &bad, None).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    }
}
