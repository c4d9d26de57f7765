//! `blkmesh.v1.NodeService` over [`Control`].

use std::sync::Arc;

use blkmesh_proto::v1::node_service_server::NodeService;
use blkmesh_proto::v1::{
    AddNodeRequest, AddNodeResponse, GetNodeRequest, GetNodeResponse, ListNodesRequest,
    ListNodesResponse, RemoveNodeRequest, RemoveNodeResponse, ResizeNodeRequest,
    ResizeNodeResponse, UpdateNodeRequest, UpdateNodeResponse,
};
use tonic::{Request, Response, Status};

use crate::control::hub::Control;
use crate::core::error::ApiError;

/// `blkmesh.v1.NodeService`.
pub(crate) struct NodeApi(pub Arc<Control>);

#[tonic::async_trait]
impl NodeService for NodeApi {
    async fn add_node(
        &self,
        request: Request<AddNodeRequest>,
    ) -> Result<Response<AddNodeResponse>, Status> {
        let r = request.into_inner();
        let spec = r.node.ok_or(ApiError::Missing("node"))?;
        let info = match r.backing_from_header {
            true => self.0.add_node_from_header(spec).await?,
            false => self.0.add_node(spec).await?,
        };
        Ok(Response::new(AddNodeResponse { node: Some(info) }))
    }

    async fn remove_node(
        &self,
        request: Request<RemoveNodeRequest>,
    ) -> Result<Response<RemoveNodeResponse>, Status> {
        self.0.remove_node(&request.into_inner().name).await?;
        Ok(Response::new(RemoveNodeResponse {}))
    }

    async fn list_nodes(
        &self,
        _request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        let nodes = self.0.list_nodes();
        Ok(Response::new(ListNodesResponse { nodes }))
    }

    async fn get_node(
        &self,
        request: Request<GetNodeRequest>,
    ) -> Result<Response<GetNodeResponse>, Status> {
        let node = self.0.get_node(&request.into_inner().name)?;
        Ok(Response::new(GetNodeResponse { node: Some(node) }))
    }

    async fn update_node(
        &self,
        request: Request<UpdateNodeRequest>,
    ) -> Result<Response<UpdateNodeResponse>, Status> {
        let spec = request.into_inner().node.ok_or(ApiError::Missing("node"))?;
        let info = self.0.update_node(spec).await?;
        Ok(Response::new(UpdateNodeResponse { node: Some(info) }))
    }

    async fn resize_node(
        &self,
        request: Request<ResizeNodeRequest>,
    ) -> Result<Response<ResizeNodeResponse>, Status> {
        let r = request.into_inner();
        let info = self.0.resize_node(&r.name, r.size).await?;
        Ok(Response::new(ResizeNodeResponse { node: Some(info) }))
    }
}
