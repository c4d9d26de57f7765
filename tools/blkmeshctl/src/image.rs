//! `image create|info`: image files, as `qemu-img create` and `qemu-img
//! info` (the manager does the work, on its host).

use blkmesh_graph::size::{parse_size, parse_size_u32};
use blkmesh_proto::client::ManagerChannel;
use blkmesh_proto::v1::get_image_info_request::Target;
use blkmesh_proto::v1::image_service_client::ImageServiceClient;
use blkmesh_proto::v1::{
    CreateImageRequest, GetImageInfoRequest, ImageFormat, ImageInfo, Preallocation,
};
use clap::{Subcommand, ValueEnum};
use serde::Serialize;

use crate::failure::Failure;
use crate::view::{print_json, print_table, Output};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum FormatArg {
    Qcow2,
    Raw,
}

impl FormatArg {
    fn pb(self) -> i32 {
        match self {
            FormatArg::Qcow2 => ImageFormat::Qcow2 as i32,
            FormatArg::Raw => ImageFormat::Raw as i32,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum PreallocationArg {
    Off,
    Metadata,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ImageCmd {
    /// Create an image file (it must not exist).
    Create {
        /// Absolute path of the new image.
        path: String,
        #[arg(long, value_enum, default_value = "qcow2")]
        format: FormatArg,
        /// Virtual size, e.g. 10G.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// qcow2 cluster size, e.g. 64k (default 64k).
        #[arg(long, value_parser = parse_size_u32, default_value = "0", hide_default_value = true)]
        cluster_size: u32,
        /// Backing file to record in the header (qcow2).
        #[arg(long, requires = "backing_format")]
        backing: Option<String>,
        #[arg(long, value_enum)]
        backing_format: Option<FormatArg>,
        #[arg(long, value_enum, default_value = "off")]
        preallocation: PreallocationArg,
    },
    /// Describe an image file, or the chain of a node.
    Info {
        /// Absolute path of an image file.
        #[arg(required_unless_present = "node", conflicts_with = "node")]
        path: Option<String>,
        /// A qcow2 or io_uring node: its chain as the graph names it.
        #[arg(long)]
        node: Option<String>,
    },
}

#[derive(Serialize)]
struct InfoView<'a> {
    node: &'a str,
    path: &'a str,
    format: &'static str,
    virtual_size: u64,
    disk_size: u64,
    cluster_size: u64,
    allocated: u64,
    backing_file: &'a str,
    backing_format: &'a str,
}

fn format_name(f: i32) -> &'static str {
    match ImageFormat::try_from(f) {
        Ok(ImageFormat::Qcow2) => "qcow2",
        Ok(ImageFormat::Raw) => "raw",
        _ => "unknown",
    }
}

pub(crate) fn print_chain(out: Output, chain: &[ImageInfo]) {
    let views: Vec<InfoView<'_>> = chain
        .iter()
        .map(|i| InfoView {
            node: &i.node,
            path: &i.path,
            format: format_name(i.format),
            virtual_size: i.virtual_size,
            disk_size: i.disk_size,
            cluster_size: i.cluster_size,
            allocated: i.allocated,
            backing_file: &i.backing_file,
            backing_format: &i.backing_format,
        })
        .collect();
    if out.json {
        return print_json(&views);
    }
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.to_string()
        }
    };
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|v| {
            vec![
                dash(v.node),
                v.path.to_string(),
                v.format.to_string(),
                v.virtual_size.to_string(),
                v.allocated.to_string(),
                v.disk_size.to_string(),
                v.cluster_size.to_string(),
                dash(v.backing_file),
            ]
        })
        .collect();
    print_table(
        &[
            "NODE",
            "PATH",
            "FORMAT",
            "SIZE",
            "ALLOCATED",
            "DISK",
            "CLUSTER",
            "BACKING",
        ],
        &rows,
    );
}

pub(crate) async fn image(
    cmd: ImageCmd,
    channel: ManagerChannel,
    out: Output,
) -> Result<(), Failure> {
    let mut client = ImageServiceClient::new(channel);
    match cmd {
        ImageCmd::Create {
            path,
            format,
            size,
            cluster_size,
            backing,
            backing_format,
            preallocation,
        } => {
            let image = client
                .create_image(CreateImageRequest {
                    path,
                    format: format.pb(),
                    size,
                    cluster_size,
                    backing_file: backing.unwrap_or_default(),
                    backing_format: backing_format.map_or(0, FormatArg::pb),
                    preallocation: match preallocation {
                        PreallocationArg::Off => Preallocation::Off as i32,
                        PreallocationArg::Metadata => Preallocation::Metadata as i32,
                    },
                })
                .await?
                .into_inner()
                .image
                .unwrap_or_default();
            print_chain(out, &[image]);
        }
        ImageCmd::Info { path, node } => {
            let target = match (path, node) {
                (_, Some(n)) => Target::Node(n),
                (Some(p), None) => Target::Path(p),
                (None, None) => unreachable!("clap requires a path or --node"),
            };
            let chain = client
                .get_image_info(GetImageInfoRequest {
                    target: Some(target),
                })
                .await?
                .into_inner()
                .chain;
            print_chain(out, &chain);
        }
    }
    Ok(())
}
